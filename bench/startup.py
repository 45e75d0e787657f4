"""Benchmark: a stage job's start-up, the interpreter and imports until the stage would begin work, and its exit.

    python bench/startup.py [--repeats 5] [--stages retrain decompose report] [--against ../before]

Times ``python -m flora_steps.stages.<stage> --help`` (imports every module the stage
runs, parses its arguments, does no work, exits) for each stage, interleaved over
``--repeats`` rounds so that a noisy neighbour hits every stage alike, and prints the
median with the spread, and the median of a bare ``python -c "import torch"`` and of
``import torch, timm`` beside them for scale. On a slow machine most of a small job is
this start-up: the workflow engines start one process per job.

``--against DIR`` times the same commands in another checkout too (``python -m`` runs
the package of its working directory), interleaved with this one's, and prints the
ratio: a change's effect measured side by side, e.g. with ``git worktree add ../before HEAD~1``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flora_steps.pipeline.catalogue import STAGES
from flora_steps.pipeline.code import PACKAGE, STAGES_PACKAGE


def seconds(command: list[str], folder: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stages", nargs="+", default=list(dict.fromkeys(s.module for s in STAGES.values())))
    parser.add_argument("--against", type=Path, help="another checkout of the project, timed side by side")
    args = parser.parse_args()
    commands = {"import torch": [sys.executable, "-c", "import torch"]}
    commands["import torch, timm"] = [sys.executable, "-c", "import torch, timm"]
    commands |= {stage: [sys.executable, "-m", f"{STAGES_PACKAGE}.{stage}", "--help"] for stage in args.stages}
    folders = {"this": PACKAGE.parent} | ({"against": args.against.resolve()} if args.against else {})
    times = {(name, tree): [] for name in commands for tree in folders}
    for _ in range(args.repeats):
        for name, command in commands.items():
            for tree, folder in folders.items():
                times[name, tree].append(seconds(command, folder))
    header = f"{'command':<18} {'median (s)':>10}  {'min–max (s)':>12}"
    if args.against:
        header += f"  {'against (s)':>11}  {'min–max (s)':>12}  {'ratio':>5}"
    print(header)
    for name in commands:
        this = times[name, "this"]
        line = f"{name:<18} {statistics.median(this):>10.2f}  {min(this):>5.2f}–{max(this):<6.2f}"
        if args.against:
            other = times[name, "against"]
            ratio = statistics.median(this) / statistics.median(other)
            line += f"  {statistics.median(other):>11.2f}  {min(other):>5.2f}–{max(other):<6.2f}  {ratio:>5.2f}"
        print(line)


if __name__ == "__main__":
    main()
