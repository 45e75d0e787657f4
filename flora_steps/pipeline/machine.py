"""What a machine's timings depend on beyond the params: its processor, its GPUs and the library versions.

``host_fingerprint`` is what Snakemake tracks for the stages that time models on the
machine (a stage's ``machine`` flag): a new machine or a new torch reruns them. It reads
``/proc/cpuinfo``, ``nvidia-smi`` and package metadata, so the Snakefile stays quick
(no torch import); the stages write the full key of their own process beside their timings.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

#: The libraries whose versions key a latency table.
LIBRARIES = ("torch", "timm")


@cache
def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """The NVIDIA GPUs ``nvidia-smi`` lists (none without it)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(  # noqa: PLW1510 - a failure is its return code
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def library_versions() -> dict[str, str]:
    """The installed version of each of ``LIBRARIES``."""
    return {name: metadata.version(name) for name in LIBRARIES}


def host_fingerprint(device: str) -> dict[str, object]:
    """This host's processor, GPUs (unless ``compute.device`` is ``cpu``) and library versions."""
    gpus = [] if device == "cpu" else gpu_names()
    return {"cpu": cpu_name(), "gpus": gpus, **library_versions()}
