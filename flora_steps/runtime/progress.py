"""Progress bars: live on a terminal, an occasional line when stderr is a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress(iterable: Iterable | None = None, desc: str = "", inner: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar for a long loop.

    On a terminal it refreshes live. Written to a log (Snakemake, a cluster job), it
    prints a line every minute, and ``inner`` bars (short loops inside a long one,
    such as an evaluation pass) are left out.
    """
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        dynamic_ncols=True,
        mininterval=0.1 if interactive else 60.0,
        leave=not inner,
        disable=inner and not interactive,
        **kwargs,
    )
