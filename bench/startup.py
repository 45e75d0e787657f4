"""Benchmark: a stage job's start-up, the interpreter and imports until the stage would begin work.

    python bench/startup.py [--repeats 5] [--stages retrain decompose report]

Times ``python -m flora_steps.stages.<stage> --help`` (imports every module the stage
runs, parses its arguments, does no work) for each stage, interleaved over
``--repeats`` rounds so that a noisy neighbour hits every stage alike, and prints the
median with the spread, and the median of a bare ``python -c "import torch"`` and of
``import torch, timm`` beside them for scale. On a slow machine most of a small job is
this start-up: the workflow engines start one process per job.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from flora_steps.pipeline.catalogue import STAGES
from flora_steps.pipeline.code import STAGES_PACKAGE


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stages", nargs="+", default=list(dict.fromkeys(s.module for s in STAGES.values())))
    args = parser.parse_args()
    commands = {"import torch": [sys.executable, "-c", "import torch"]}
    commands["import torch, timm"] = [sys.executable, "-c", "import torch, timm"]
    commands |= {stage: [sys.executable, "-m", f"{STAGES_PACKAGE}.{stage}", "--help"] for stage in args.stages}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, command in commands.items():
            times[name].append(seconds(command))
    print(f"{'command':<18} {'median (s)':>10}  {'min–max (s)':>12}")
    for name, values in times.items():
        print(f"{name:<18} {statistics.median(values):>10.2f}  {min(values):>5.2f}–{max(values):<5.2f}")


if __name__ == "__main__":
    main()
