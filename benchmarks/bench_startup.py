"""Start-up time of the ``revision`` command against, in the same run, the bare interpreter and the imports a
CLI that loaded every stage's libraries up front would pay. Target: ``revision --help`` within 1 s.

    python benchmarks/bench_startup.py --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

EAGER = "import torch, transformers, accelerate, open_clip, pandas, mlflow, peft"
COMMANDS = {
    "python -c pass (interpreter)": [sys.executable, "-c", "pass"],
    "revision --help": [sys.executable, "-m", "stages", "--help"],
    "revision pretrain --help": [sys.executable, "-m", "stages", "pretrain", "--help"],
    "eager imports of the stages": [sys.executable, "-c", EAGER],
}


def seconds(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the median is reported")
    args = parser.parse_args()
    seconds(COMMANDS["eager imports of the stages"], 1)  # warm the file cache for every command alike
    results = {name: seconds(argv, args.repeat) for name, argv in COMMANDS.items()}
    base = results["python -c pass (interpreter)"]
    for name, value in results.items():
        print(f"{name:32s} {value:6.2f} s  ({value / base:5.1f}x the bare interpreter)")
    verdict = "within" if results["revision --help"] <= 1.0 else "OVER"
    print(f"revision --help: {results['revision --help']:.2f} s, {verdict} the 1 s target")


if __name__ == "__main__":
    main()
