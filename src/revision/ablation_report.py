"""reports/ablation.md: the study's experiments as tables of mean ± sd over seeds and seed-paired comparisons, never typed by hand."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from revision.paired import PairedDifference, benjamini_hochberg, detectable_difference, paired_difference
from revision.study import (
    DOWNSTREAM,
    GAP,
    HEADLINE,
    LABELS,
    LOWER_IS_BETTER,
    PAPER,
    REFERENCE,
    TABLES,
    WORLDS,
    Result,
    arm,
    downstream,
    encoder_build,
    gap_metric,
    precisions,
    resolution,
    summarize,
)

PAPER_TEXT = (
    "no alignment 47.50, C3 48.06, anchor only 46.68, anchor + trace 48.67, full ReAlign 50.16, no stage 1 "
    "43.58; paired 1M pairs 48.91 vs ReVision on 2M texts 49.75."
)
CHECKPOINTS = {"pretrain": "after stage 1 only (zero-shot: no paired image seen)", "finetune": "after stage 2"}


FDR = 0.05  # false discovery rate of each report's family of comparisons (Benjamini-Hochberg)


@dataclass(frozen=True)
class Verdict:
    difference: PairedDifference | None  # None: fewer than two seeds with both arms
    p_adjusted: float  # over the report's family
    detectable: float  # the metric's smallest detectable difference for these seeds (80% power)

    def text(self) -> str:
        if self.difference is None:
            return "n/a"
        delta = self.difference.delta
        if self.p_adjusted < FDR:
            return f"{delta:+.3f} detected (p = {self.p_adjusted:.3f})"
        return f"{delta:+.3f} not detected (detectable {self.detectable:.3f})"


def render(results: list[Result], runs: list[dict]) -> str:
    groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for result in results:
        groups[(result.world, result.condition)].append(result)
    verdicts = comparisons(groups)
    lines = _header(results, groups, runs, verdicts)
    for world in ("", *WORLDS):
        lines += _world_tables(world, groups, _world_title(world, results), verdicts)
    lines += _world_effect(groups, verdicts)
    lines += _detectable(verdicts)
    return "\n".join(lines) + "\n"


def reference_pairs(groups: dict) -> list[tuple]:
    """Every comparison the report shows: each condition against its reference (``REFERENCE``, else full
    ReAlign) in its world, and each condition of a world against itself in the plain world."""
    pairs = [(key, (key[0], REFERENCE.get(key[1], "full"))) for key in sorted(groups)]
    pairs = [(key, reference) for key, reference in pairs if key != reference and reference in groups]
    return pairs + [(key, ("", key[1])) for key in sorted(groups) if key[0] and ("", key[1]) in groups]


def comparisons(groups: dict) -> dict[tuple, Verdict]:
    """(condition, reference, checkpoint, metric) -> its seed-paired verdict, the p-values adjusted together
    over every comparison of the report; pairs that ran on other encoder builds or precisions are left out."""
    raw = {}
    for key, reference in reference_pairs(groups):
        seeds, _ = split_seeds(groups[key], groups[reference])
        for checkpoint, metric in HEADLINE:
            raw[(key, reference, checkpoint, metric)] = seed_paired(groups[key], groups[reference], checkpoint, metric, seeds)
    tested = [k for k, difference in raw.items() if difference is not None]
    adjusted = dict(zip(tested, benjamini_hochberg([raw[k].p for k in tested])))
    detectable = _detectable_by_metric(raw)
    return {k: Verdict(d, adjusted.get(k, math.nan), detectable.get(k[2:], math.inf)) for k, d in raw.items()}


def seed_paired(
    a: list[Result], b: list[Result], checkpoint: str, metric: str, seeds: set[int] | None = None
) -> PairedDifference | None:
    """``a`` minus ``b`` over the seeds both ran (of ``seeds``, when given; positive: ``a`` better, whichever way
    the metric points)."""
    values_a = {r.seed: downstream(r, checkpoint, metric) for r in a}
    values_b = {r.seed: downstream(r, checkpoint, metric) for r in b}
    both = values_a.keys() & values_b.keys() & (seeds if seeds is not None else values_a.keys())
    seeds = sorted(s for s in both if values_a[s] is not None and values_b[s] is not None)
    if len(seeds) < 2:
        return None
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    step = resolution([*a, *b], checkpoint, metric)  # one item of an accuracy: the least spread it can have
    return paired_difference([sign * values_a[s] for s in seeds], [sign * values_b[s] for s in seeds], sd_floor=step)


def _detectable_by_metric(raw: dict) -> dict[tuple[str, str], float]:
    """Per (checkpoint, metric): the smallest difference detectable at 80% power with the seeds run, from the
    spread of its paired differences pooled over the family."""
    spreads = defaultdict(list)
    for (_, _, checkpoint, metric), difference in raw.items():
        if difference is not None:
            spreads[(checkpoint, metric)].append(difference)
    return {metric: detectable_difference(math.sqrt(sum(d.sd**2 for d in ds) / len(ds)), max(d.n for d in ds))
            for metric, ds in spreads.items()}


def _detectable(verdicts: dict) -> list[str]:
    found = {k[2:]: v.detectable for k, v in verdicts.items() if v.difference is not None}
    if not found:
        return []
    seeds = max(v.difference.n for v in verdicts.values() if v.difference is not None)
    lines = ["## Smallest detectable differences", "",
             f"What each metric can detect with {seeds} seeds, seed-paired, at 80% power (two-sided, alpha = 0.05), from "
             "the sd of its paired differences pooled over the comparisons above:", "",
             _row(["checkpoint", "metric", "detectable difference"]), _row(["---"] * 3)]
    return lines + [_row([checkpoint, metric, f"{value:.3f}"]) for (checkpoint, metric), value in found.items()] + [""]


def _world_tables(world: str, groups: dict, suffix: str, verdicts: dict) -> list[str]:
    """Each table of ``TABLES`` with the world's conditions in it, leaving out a table whose rows another
    table of the world shows too (a world runs some conditions only; a study run in parts, some seeds)."""
    present = {title: [c for c in conditions if groups.get((world, c))] for title, conditions in TABLES.items()}
    lines: list[str] = []
    shown: list[set] = []
    for title, rows in present.items():
        inside_another = any(set(rows) < set(other) for other in present.values())
        if rows and not inside_another and set(rows) not in shown:
            shown.append(set(rows))
            lines += _section(title + suffix, [(world, c) for c in rows], groups, verdicts)
    return lines


def _world_title(world: str, results: list[Result]) -> str:
    if not world:
        return ""
    setting, _, what = WORLDS[world]
    section, key = setting.split(".")
    values = {r.params.get(section, {}).get(key) for r in results if r.world == world}
    return f", {what} ({setting} = {', '.join(str(v) for v in sorted(values, key=str)) or '?'})"


def _world_effect(groups: dict, verdicts: dict) -> list[str]:
    """A condition in each world against itself in the plain world: what the world's setting changes."""
    pairs = [(key, ("", key[1])) for key in sorted(groups) if key[0] and ("", key[1]) in groups]
    return _comparisons(
        pairs,
        groups,
        "What a world's setting changes (each condition against itself in the plain world; positive: better with the setting):",
        verdicts,
    )


def _header(results: list[Result], groups: dict, runs: list[dict], verdicts: dict) -> list[str]:
    seeds = sorted({r.seed for r in results})
    lines = [
        "# Ablation study",
        "",
        "Generated by `revision study` from `dvc exp show --json` and reports/study_results.json (do not edit by hand). "
        f"{len(results)} finished experiments, {len(groups)} conditions, seeds {seeds}.",
        "Cells are mean ± sd over seeds (model, pretrain and finetune seed). Differences are **seed-paired**: seed s "
        "of two conditions shares initialisation, data order and eval items, so each difference is the mean over "
        "seeds of the per-seed difference (positive: better, whichever way the metric points), tested with a paired "
        f"t-test whose p-values are adjusted over all {sum(v.difference is not None for v in verdicts.values())} "
        f"comparisons of this report (Benjamini-Hochberg, false discovery rate {FDR}). A difference reads "
        "**detected (p)** when its adjusted p is below that, else **not detected (detectable d)**, d being the "
        "smallest difference the seeds run could detect at 80% power (end of the report); for a ranked-probe "
        "accuracy the per-seed differences are taken to vary by at least one image.",
        "",
        "Gap columns describe the text stage 1 trained on, against the image embeddings: centroid gap, trace ratio "
        "and kNN modality mixing on the unpaired corpus, text→image R@1 on the paired eval captions, and the class "
        "accuracy on eval *images* of a linear probe trained on that text, and the geometry of the eval pairs: phi "
        "(mean cosine of an aligned caption and its own image), psi (correlation of image-image and caption-caption "
        "cosines) and omega_k (overlap of an item's k nearest neighbours among images and among captions) "
        "(reports/realign/metrics.json; experiments made before these were measured show —).",
        "Downstream (reports/evaluate/metrics.json): per-token NLL of the reference caption given its image "
        "(caption_nll, lower is better); image_gain, how much lower that NLL is than with another eval image in its "
        "place (nats/token: what the model reads from the image; 0 = it ignores it); the ranked probes, the share of "
        "images for which the reference caption with the true garment class, colour or shape is more likely than "
        "the same caption naming a seeded other one (rank_*_acc, chance 0.5); the garment class named in the "
        "generated caption (garment_acc), its CIDEr, POPE accuracy, F1 and yes-ratio (balanced probes: chance "
        "accuracy is 0.5, and a model that always says yes has yes-ratio 1 and F1 0.667 without reading the image) "
        "and VQA exact match.",
        "",
        "The paper's numbers (11-benchmark averages after both stages, 2M-text scale) are quoted for the ordering "
        "they claim, not for their scale: " + PAPER_TEXT,
        "",
    ]
    for run in runs:
        what = ", ".join(filter(None, [
            "plain: " + "/".join(run["conditions"]) if run.get("conditions") else "",
            "stress: " + "/".join(run["stress_conditions"]) if run.get("stress_conditions") and run.get("stress_shift") else "",
            "existence: " + "/".join(run["existence_conditions"]) if run.get("existence_conditions") else "",
        ]))
        # one line per run of `revision study` ("Grid run" as reports/ablation.md has always said it)
        lines.append(f"Grid run{' started ' + run['started'] if run.get('started') else ''}: {run['experiments']} "
                     f"experiments{' (' + what + ')' if what else ''} in {run['wall_s'] / 60:.1f} min, {run['jobs']} at "
                     f"a time; dvc exit code {run['dvc_exit_code']}"
                     f"{'; without a result: ' + ', '.join(run['without_result']) if run.get('without_result') else ''}.")
    if runs:
        lines.append("")
    finished = sorted(r.finished for r in results if r.finished)
    if finished:
        lines += [f"Experiments finished between {finished[0]} and {finished[-1]}.", ""]
    builds = Counter(encoder_build(r) for r in results if encoder_build(r))
    if len(builds) > 1:
        counts = ", ".join(f"{build} ({n} experiments)" for build, n in sorted(builds.items()))
        lines += [f"The experiments ran on {len(builds)} builds of the encoder, trained from the same params (the "
                  f"floating-point results of its training differ between machines): {counts}.", ""]
    used = Counter("/".join(precisions(r)) for r in results)
    if len(used) > 1:
        counts = ", ".join(f"{p} ({n} experiments)" for p, n in sorted(used.items()))
        lines += [f"The experiments ran at {len(used)} precisions (pretrain/finetune/evaluate; no: fp32): {counts}.", ""]
    missing = [f"{w + '-' if w else ''}{c}" for (w, c), rs in groups.items() if len(rs) < len(seeds)]
    if missing:
        lines += [f"Conditions with fewer seeds than the others: {', '.join(sorted(missing))}.", ""]
    return lines


def _section(title: str, keys: list[tuple[str, str]], groups: dict, verdicts: dict) -> list[str]:
    present = [k for k in keys if groups.get(k)]
    if not present:
        return []
    lines = [f"## {title}", ""]
    gap_cols = list(GAP)
    head = ["condition", "seeds", "paper avg"] + gap_cols
    lines += [_row(head), _row(["---"] * len(head))]
    for key in present:
        runs = groups[key]
        paper = "—" if key[0] or key[1] not in PAPER else f"{PAPER[key[1]]:.2f}"
        cells = [summarize(gap_metric(r, col) for r in runs).cell() for col in gap_cols]
        lines.append(_row([LABELS[key[1]], str(len(runs)), paper, *cells]))
    lines.append("")
    for checkpoint, what in CHECKPOINTS.items():
        lines += [f"Downstream, {what}:", ""]
        head = ["condition", *DOWNSTREAM]
        lines += [_row(head), _row(["---"] * len(head))]
        for key in present:
            cells = [summarize(downstream(r, checkpoint, m) for r in groups[key]).cell() for m in DOWNSTREAM]
            lines.append(_row([LABELS[key[1]], *cells]))
        lines.append("")
    pairs = [(key, (key[0], REFERENCE.get(key[1], "full"))) for key in present]
    pairs = [(key, reference) for key, reference in pairs if key != reference and reference in present]
    lines += _comparisons(pairs, groups, "Differences to the reference condition (positive: this condition is better):", verdicts)
    return lines


def _comparisons(pairs: list[tuple], groups: dict, heading: str, verdicts: dict) -> list[str]:
    """Each (condition, reference) pair's headline differences (``REFERENCE``: the same recipe without Ross,
    the encoder for VoRA; else full ReAlign)."""
    if not pairs:
        return []
    lines = [heading, ""]
    for key, reference in pairs:
        matched, mismatched = split_seeds(groups[key], groups[reference])
        left_out = f"seeds left out, another encoder build or precision: {'; '.join(mismatched)}"
        if mismatched and len(matched) < 2:
            lines.append(f"- {_label(key)} vs {_label(reference)}: not compared, fewer than two seeds ran on the same "
                         f"encoder build and precision ({left_out})")
            continue
        parts = [f"{checkpoint} {metric} {verdicts[(key, reference, checkpoint, metric)].text()}"
                 for checkpoint, metric in HEADLINE]
        lines.append(f"- {_label(key)} vs {_label(reference)}: " + "; ".join(parts) + (f" ({left_out})" if mismatched else ""))
    return lines + [""]


def split_seeds(a: list[Result], b: list[Result]) -> tuple[set[int], list[str]]:
    """The seeds both ran on the same encoder build and at the same precisions (``arm``), and the others, named:
    those are never paired."""
    arms_a, arms_b = {r.seed: arm(r) for r in a}, {r.seed: arm(r) for r in b}
    both = sorted(arms_a.keys() & arms_b.keys())
    matched = {seed for seed in both if arms_a[seed] == arms_b[seed]}
    return matched, [f"seed {seed}: {arms_a[seed]} vs {arms_b[seed]}" for seed in both if seed not in matched]


def _label(key: tuple[str, str]) -> str:
    return LABELS[key[1]] + (f" ({key[0]})" if key[0] else "")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
