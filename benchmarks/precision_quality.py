"""Does bf16 change what the model learns? Stage 1, stage 2 and evaluate at the study profile's sizes, once in
fp32 and once in bf16 (``mixed_precision`` of all three stages) for each seed, then the seed-paired differences
of the precise metrics (teacher-forced: caption NLL, image_gain, the ranked probes) and of the generated ones.

    python benchmarks/precision_quality.py --seeds 0 1 2      # after `dvc repro` has made data/ up to lm

Each run reads the pipeline's data/ (prepared, embeddings, realign, lm) and writes under ``--work``; a run whose
evaluation exists is not run again, so the check resumes. Stage times are printed per run (the cost of an
experiment in each precision). A difference counts as "within" when it is smaller than the smallest difference
the study could detect between two conditions with these seeds: ``detectable_difference`` on the fp32 seed sd
times sqrt(2) (two independent seeds; seed-paired conditions do better), the sd taken as at least one item for
a ranked-probe accuracy, as the study report takes it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time
from pathlib import Path

import yaml

from revision.config import merge_into, read_params
from revision.paired import detectable_difference, paired_difference

PRECISIONS = {"fp32": "no", "bf16": "bf16"}
PRECISE = ("caption_nll", "image_gain", "rank_garment_acc", "rank_colour_acc", "rank_shape_acc")
GENERATED = ("cider", "garment_acc", "vqa_acc", "pope_acc")


def run_params(args, seed: int, precision: str) -> dict:
    params = read_params(args.params)
    merge_into(params, {k: v for k, v in read_params(args.profile).items() if k != "study"})
    merge_into(params, {"model": {"seed": seed}, "pretrain": {"seed": seed, "mixed_precision": precision},
                        "finetune": {"seed": seed, "mixed_precision": precision},
                        "evaluate": {"mixed_precision": precision}})
    return params


def run_one(args, seed: int, label: str) -> dict:
    """The three stages of one (seed, precision), or what an earlier call recorded."""
    work = args.work / f"{label}-s{seed}"
    record = work / "run.json"
    if record.exists():
        return json.loads(record.read_text())
    work.mkdir(parents=True, exist_ok=True)
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(run_params(args, seed, PRECISIONS[label])))
    commands = {
        "pretrain": ["pretrain", "--out", work / "pretrain"],
        "finetune": ["finetune", "--pretrained", work / "pretrain", "--out", work / "finetune"],
        "evaluate": ["evaluate", "--checkpoints", work / "pretrain", "--checkpoints", work / "finetune",
                     "--metrics", work / "evaluate.json", "--predictions", work / "predictions"],
    }
    seconds = {}
    for stage, command in commands.items():
        extra = [] if stage == "evaluate" else ["--metrics", work / f"{stage}.json", "--loss-plot",
                                                work / f"{stage}_loss.csv", "--checkpoints", work / f"ckpt-{stage}"]
        start = time.perf_counter()
        subprocess.run(["revision", command[0], "--params", params, *command[1:], *extra], check=True)
        seconds[stage] = time.perf_counter() - start
        print(f"{label} seed {seed}: {stage} {seconds[stage] / 60:.2f} min", flush=True)
    result = {"seed": seed, "precision": label, "seconds": seconds,
              "metrics": json.loads((work / "evaluate.json").read_text()),
              "recorded": {stage: json.loads((work / f"{stage}.json").read_text())["precision"]
                           for stage in ("pretrain", "finetune")}}
    record.write_text(json.dumps(result, indent=2))
    return result


def one_item(runs: dict[str, list[dict]], checkpoint: str, metric: str) -> float:
    """1 / the items a ranked-probe accuracy counts (0 for other metrics)."""
    if not (metric.startswith("rank_") and metric.endswith("_acc")):
        return 0.0
    counts = [r["metrics"][checkpoint].get(f"n_{metric[:-4]}") for rs in runs.values() for r in rs]
    return 1.0 / min(counts) if all(counts) else 0.0


def table(runs: dict[str, list[dict]]) -> list[str]:
    n = len(runs["fp32"])
    lines = [f"| checkpoint | metric | fp32 mean ± sd | bf16 mean ± sd | bf16 − fp32 (paired, 95% CI) | p | "
             f"detectable at {n} seeds | verdict |", "|" + "---|" * 8]
    for checkpoint in ("pretrain", "finetune"):
        for metric in PRECISE + (GENERATED if checkpoint == "finetune" else ()):
            values = {label: [r["metrics"][checkpoint].get(metric) for r in rs] for label, rs in runs.items()}
            if any(v is None for vs in values.values() for v in vs):
                continue
            fp32, bf16 = values["fp32"], values["bf16"]
            step = one_item(runs, checkpoint, metric)  # an accuracy moves by one item at least (as the study takes it)
            diff = paired_difference(bf16, fp32, sd_floor=step)
            detectable = detectable_difference(max(statistics.stdev(fp32), step) * math.sqrt(2), n)
            within = "within" if abs(diff.delta) < detectable else "OUTSIDE"
            lines.append(f"| {checkpoint} | {metric}{'' if metric in PRECISE else ' (generated)'} | "
                         f"{statistics.fmean(fp32):.4f} ± {statistics.stdev(fp32):.4f} | "
                         f"{statistics.fmean(bf16):.4f} ± {statistics.stdev(bf16):.4f} | {diff.delta:+.4f} "
                         f"[{diff.ci[0]:+.4f}, {diff.ci[1]:+.4f}] | {diff.p:.2f} | {detectable:.4f} | {within} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--profile", type=Path, default=Path("profiles/study.yaml"))
    parser.add_argument("--work", type=Path, default=Path("data/precision_quality"))
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {label: [] for label in PRECISIONS}
    for seed in args.seeds:  # seed-major: a check stopped early still has whole pairs
        for label in PRECISIONS:
            runs[label].append(run_one(args, seed, label))
    for label, rs in runs.items():
        minutes = [sum(r["seconds"].values()) / 60 for r in rs]
        stages = {s: statistics.fmean(r["seconds"][s] for r in rs) / 60 for s in rs[0]["seconds"]}
        print(f"{label}: recorded {sorted({str(r['recorded']) for r in rs})}; {statistics.fmean(minutes):.2f} min per "
              f"experiment (" + ", ".join(f"{s} {m:.2f}" for s, m in stages.items()) + ")")
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
