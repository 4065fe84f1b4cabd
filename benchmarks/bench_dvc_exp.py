"""What one `dvc exp run` costs beyond its stages: how much the DVC cache grows and how long DVC spends outside
the stage commands, against the same stage commands run directly, timed in the same run.

Run it in a workspace where `make repro` has finished (`dvc status` clean, nothing uncommitted in git):

    python benchmarks/bench_dvc_exp.py -S finetune.lora_r=4 -S finetune.max_samples=64 -S evaluate.max_images=20

The default overrides are a LoRA configuration kept short (the stages' own time does not matter here, only
what DVC adds). Afterwards the workspace is put back as it was (`git checkout` of what the experiment changed,
then `dvc checkout`); the experiment stays listed in `dvc exp show`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SET = ["finetune.lora_r=4", "finetune.max_samples=64", "evaluate.max_images=20"]


def run(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start, done.stdout + done.stderr


def cache_bytes(cache: Path = Path(".dvc/cache")) -> int:
    return sum(f.stat().st_size for f in cache.rglob("*") if f.is_file() and not f.is_symlink())


def changed_files() -> list[str]:
    return subprocess.run(["git", "diff", "--name-only"], capture_output=True, text=True, check=True).stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-S", "--set-param", action="append", help=f"dvc exp run -S overrides (default: {DEFAULT_SET})")
    args = parser.parse_args()
    overrides = args.set_param or DEFAULT_SET
    if changed_files():
        sys.exit("commit or stash your git changes first: the benchmark restores the workspace with git checkout")
    _, status = run(["dvc", "status"])
    if "up to date" not in status:
        sys.exit(f"run `dvc repro` first; dvc status says:\n{status}")

    before = cache_bytes()
    exp_seconds, log = run(["dvc", "exp", "run", *[a for o in overrides for a in ("-S", o)]])
    growth = cache_bytes() - before
    stages = re.findall(r"Running stage '([\w-]+)'", log)
    direct = {stage: run([sys.executable, "-m", "stages", stage])[0] for stage in stages}  # same params, same work
    dvc_seconds = exp_seconds - sum(direct.values())

    subprocess.run(["git", "checkout", "--", *changed_files()], check=True)
    subprocess.run(["dvc", "checkout", "--force"], check=True, capture_output=True)

    print(f"dvc exp run {' '.join('-S ' + o for o in overrides)}")
    print(f"stages run: {', '.join(stages)}")
    for stage, seconds in direct.items():
        print(f"  {stage:10s} {seconds:7.1f} s run directly")
    print(f"dvc exp run: {exp_seconds:.1f} s in all; outside the stage commands {dvc_seconds:.1f} s "
          f"= {dvc_seconds / max(1, len(stages)):.1f} s per stage (target <= 10 s)")
    print(f"DVC cache grew by {growth / 2**20:.1f} MiB (target <= 50 MB)")


if __name__ == "__main__":
    main()
