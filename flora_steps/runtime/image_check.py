"""A fast check that every image file of a data set can be read, before any training starts.

Per file it costs one header parse and one read of the file's last kilobyte: PIL
must identify the image, and a JPEG or PNG must end with its end marker (a file cut
short loses it). It runs on a thread pool, and its result is cached per listing
(paths, sizes, modification times) under ``$XDG_CACHE_HOME/flora/image-check``,
so a data set is checked once until a file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .progress import progress

TAIL = 1024
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def check_image(path: str) -> str | None:
    """Why the image at ``path`` cannot be used, or ``None`` when it looks whole."""
    try:
        with Image.open(path) as image:
            marker = END_MARKERS.get(image.format or "")
        if marker is not None:
            with open(path, "rb") as file:
                file.seek(max(0, os.path.getsize(path) - TAIL))
                if marker not in file.read():
                    return f"{image.format} file cut short (no end marker)"
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    return None


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flora" / "image-check"


def listing_key(paths: Sequence[str]) -> str:
    """A hash of the files' paths, sizes and modification times: it changes when any file does."""
    digest = hashlib.sha256()
    for path in paths:
        status = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def unreadable_images(paths: Sequence[str], threads: int | None = None) -> dict[str, str]:
    """Every file of ``paths`` that ``check_image`` rejects, with the reason; cached per listing."""
    cache = cache_folder() / f"{listing_key(paths)}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    threads = threads or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        reasons = progress(pool.map(check_image, paths), desc="image check", total=len(paths))
        bad = {path: reason for path, reason in zip(paths, reasons, strict=True) if reason is not None}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(bad))
        temporary.replace(cache)
    except OSError:
        pass  # a read-only home only costs a rescan next time
    return bad
