"""The ablation study: its experiments (one DVC experiment per condition × seed) and the report made from their results.

Every experiment is the pipeline with the study profile's sizes, one condition (how stage 1 gets its inputs)
and one seed (model, pretrain and finetune seeds together), in one world: the plain one, or a world that turns one
setting on for its conditions (``WORLDS``: the modality-gap stress of ``revision.stress``, or POPE-style
existence questions in the SFT mix). The report reads what ``dvc exp show --json``
returns, so every number in it comes from an experiment that DVC can show and reproduce; the results are also
kept in reports/study_results.json, so a clone without the experiment refs still has (and can re-render) them.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from revision.layout import EVALUATE_METRICS, REALIGN_METRICS, stage_metrics

ALIGNED = {"pretrain.source": "aligned", "realign.method": "realign"}
SWITCHES = ("realign.anchor", "realign.trace", "realign.centroid")
FULL = {**ALIGNED, "realign.anchor": True, "realign.trace": True, "realign.centroid": True}
ROSS = ("pretrain.ross", "finetune.ross")  # off unless a condition turns it on
GRID = {"pretrain.source": "paired", "model.visual_input": "grid"}  # LLaVA's recipe: a token per image cell
VORA = {"pretrain.source": "paired", "model.visual_input": "pixels"}  # encoder-free: patches into the LM

# Every condition sets the same keys, so no experiment inherits a value from another.
CONDITIONS: dict[str, dict[str, object]] = {
    "none": {"pretrain.source": "none"},
    "paired": {"pretrain.source": "paired"},
    "raw": {"pretrain.source": "raw"},
    "mean_shift": {**ALIGNED, "realign.method": "mean_shift"},
    "c3": {**ALIGNED, "realign.method": "c3"},
    "anchor": {**ALIGNED, "realign.anchor": True, "realign.trace": False, "realign.centroid": False},
    "anchor_trace": {**ALIGNED, "realign.anchor": True, "realign.trace": True, "realign.centroid": False},
    "full": FULL,
    "paired_ross": {"pretrain.source": "paired", "pretrain.ross": True, "finetune.ross": True},  # LLaVA + Ross
    "full_ross": {**FULL, "finetune.ross": True},  # ReVision, Ross in stage 2
    "paired_grid": GRID,
    "paired_grid_ross": {**GRID, "pretrain.ross": True, "finetune.ross": True},  # Ross as its authors run it
    "vora": VORA,
    "vora_nodistill": {**VORA, "vora.distill_weight": 0.0},
    "vora_causal": {**VORA, "vora.attention": "causal"},
}
# what a condition is compared with; others: "full"
REFERENCE = {"paired_ross": "paired", "full_ross": "full", "paired_grid": "paired", "paired_grid_ross": "paired_grid",
             "vora": "paired_grid", "vora_nodistill": "vora", "vora_causal": "vora"}
# The conditions each world runs by default (`revision study --stress-conditions` etc. pick others): part of
# what the worlds are, as the report's world tables compare them, not params.
STRESS_CONDITIONS = ("raw", "anchor", "anchor_trace", "full")
EXISTENCE_CONDITIONS = ("paired_grid", "paired_grid_ross", "full", "full_ross", "vora", "vora_nodistill", "vora_causal")
# world -> the setting it turns on, that setting's value in every other world, and what the report calls it
WORLDS = {
    "stress": ("embed.stress_shift", 0.0, "under the gap stress"),
    "existence": ("prepare.existence_questions", 0, "with existence questions in SFT"),
}
LABELS = {
    "none": "no stage 1", "paired": "paired images (LLaVA-style)", "raw": "raw text (no alignment)",
    "mean_shift": "mean shift (Unicorn)", "c3": "C3", "anchor": "ReAlign anchor only",
    "anchor_trace": "ReAlign anchor + trace", "full": "ReAlign full (ReVision)",
    "paired_ross": "paired images + Ross (both stages)", "full_ross": "ReAlign full + Ross (stage 2)",
    "paired_grid": "paired images, grid tokens", "paired_grid_ross": "paired images, grid tokens + Ross (both stages)",
    "vora": "VoRA (pixels, vision LoRA, distilled)", "vora_nodistill": "VoRA without distillation",
    "vora_causal": "VoRA with a causal mask",
}
# The paper's 11-benchmark averages (no number for mean shift); ReVision-2M text vs 1M pairs for "paired".
PAPER = {"raw": 47.50, "c3": 48.06, "anchor": 46.68, "anchor_trace": 48.67, "full": 50.16, "none": 43.58, "paired": 48.91}
TABLES = {
    "Alignment methods (cf. the paper's Table 1)": ("raw", "mean_shift", "c3", "full"),
    "ReAlign step ablation (cf. Table 5)": ("raw", "anchor", "anchor_trace", "full"),
    "What stage 1 trains on (cf. Tables 2 and 6)": ("none", "paired", "raw", "full"),
    "Ross's reconstruction loss (with and without)": (
        "paired", "paired_grid", "paired_grid_ross", "paired_ross", "full", "full_ross"
    ),
    "VoRA, encoder-free (against the encoder with grid tokens)": ("paired_grid", "vora", "vora_nodistill", "vora_causal"),
}
DOWNSTREAM = ("caption_nll", "image_gain", "rank_garment_acc", "rank_colour_acc", "rank_shape_acc", "garment_acc",
              "cider", "pope_acc", "pope_f1", "pope_yes_ratio", "vqa_acc")
LOWER_IS_BETTER = {"caption_nll", "centroid_gap"}
GAP = {  # column -> (section of reports/realign/metrics.json, key) for the aligned text
    "centroid_gap": ("after", "centroid_gap"),
    "trace_ratio": ("after", "trace_ratio"),
    "knn_mixing": ("after", "knn_mixing"),
    "t2i_r1": ("eval_after", "t2i_r1"),
    "probe_acc": ("probe_class_name", "text_aligned"),
    "phi": ("geometry_after", "phi"),  # held-out pair geometry (revision.pair_geometry)
    "psi": ("geometry_after", "psi"),
    "omega_k": ("geometry_after", "omega_k"),
}
HEADLINE = (("pretrain", "caption_nll"), ("pretrain", "image_gain"), ("pretrain", "rank_garment_acc"),
            ("finetune", "caption_nll"), ("finetune", "image_gain"), ("finetune", "rank_garment_acc"),
            ("finetune", "cider"), ("finetune", "vqa_acc"), ("finetune", "pope_acc"), ("finetune", "pope_f1"))
EVALUATION = EVALUATE_METRICS.as_posix()  # the keys of `dvc exp show --json` metrics
NAME = re.compile(rf"^study-(?:(?P<world>{'|'.join(WORLDS)})-)?(?P<condition>[a-z_0-9]+)-s(?P<seed>\d+)$")


@dataclass(frozen=True)
class Experiment:
    name: str
    overrides: dict[str, object]


@dataclass(frozen=True)
class World:
    name: str  # "" (plain: every world setting off) or a key of WORLDS
    setting: int | float  # the value of WORLDS[name] in this world
    conditions: tuple[str, ...]


def study_experiments(seeds: Sequence[int], profile: dict[str, object], worlds: Sequence[World]) -> list[Experiment]:
    """Every world's conditions × ``seeds``, each experiment with the ``profile``'s sizes. Seed-major, so a
    study stopped early still has whole seeds of every condition. Every experiment sets every world's setting
    and every condition's keys, so none inherits a value from another."""
    unknown = sorted({c for world in worlds for c in world.conditions} - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown study conditions {unknown}; known: {', '.join(CONDITIONS)}")
    # What a condition is where it does not set a key: pooled input, the ReAlign switches on, no Ross, VoRA
    # distilled at weight 1 and bidirectional. Not params: saved results are merged by experiment name, so a
    # condition must mean the same in every session, whatever params.yaml says.
    unset = {"realign.method": "realign", "model.visual_input": "pooled", **{s: True for s in SWITCHES},
             **{r: False for r in ROSS}, "vora.distill_weight": 1.0, "vora.attention": "bidirectional"}
    experiments = []
    for seed in seeds:
        for world in worlds:
            settings = {key: world.setting if name == world.name else off for name, (key, off, _) in WORLDS.items()}
            for condition in world.conditions:
                overrides = {**profile, **unset, **CONDITIONS[condition], **settings}
                overrides.update({"model.seed": seed, "pretrain.seed": seed, "finetune.seed": seed})
                prefix = f"{world.name}-" if world.name else ""
                experiments.append(Experiment(f"study-{prefix}{condition}-s{seed}", overrides))
    return experiments


def yaml_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def queue_command(experiment: Experiment) -> list[str]:
    sets = [arg for key, value in experiment.overrides.items() for arg in ("-S", f"{key}={yaml_value(value)}")]
    # --wait-for-lock: a queue that is running (an earlier `revision study`) holds the repository lock until it ends
    return ["dvc", "--wait-for-lock", "exp", "run", "--queue", "--name", experiment.name, *sets]


# ---------------------------------------------------------------- reading the experiments


@dataclass(frozen=True)
class Result:
    world: str  # "" or a key of WORLDS
    condition: str
    seed: int
    params: dict
    metrics: dict  # metrics file -> its content
    finished: str = ""  # the experiment commit's timestamp

    @property
    def name(self) -> str:
        return f"study-{self.world + '-' if self.world else ''}{self.condition}-s{self.seed}"


def study_results(exp_show: list) -> list[Result]:
    """Every finished study experiment in ``dvc exp show --json --all-commits`` output (queued and running
    ones have no timestamp or no evaluation yet); where a name ran on several baseline commits, the newest
    run counts."""
    newest: dict[str, tuple[re.Match, dict]] = {}
    for record in sorted(_records(exp_show), key=lambda r: str((r.get("data") or {}).get("timestamp") or "")):
        match = NAME.match(record.get("name") or "")
        data = record.get("data") or {}
        metrics = data.get("metrics") or {}
        if match and not record.get("error") and data.get("timestamp") and EVALUATION in metrics:
            newest[match.group(0)] = (match, data)
    results = []
    for match, data in newest.values():
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        metrics = {path: (entry or {}).get("data", {}) for path, entry in data["metrics"].items()}
        seed = int(match["seed"])
        results.append(Result(match["world"] or "", match["condition"], seed, params, metrics, str(data["timestamp"])))
    return results


def merge_results(saved: Iterable[Result], shown: Iterable[Result]) -> list[Result]:
    """One result per experiment name, the newest finished run winning (saved records are the experiments of
    earlier sessions, which a fresh clone's ``dvc exp show`` no longer lists)."""
    newest: dict[tuple, Result] = {}
    for result in sorted([*saved, *shown], key=lambda r: r.finished):
        newest[result.name] = result
    return sorted(newest.values(), key=lambda r: (r.world, r.condition, r.seed))


def pending(experiments: Iterable[Experiment], results: Iterable[Result]) -> list[Experiment]:
    """The experiments that have no finished result yet: a study run in parts goes on where it stopped."""
    done = {result.name for result in results}
    return [experiment for experiment in experiments if experiment.name not in done]


def results_record(results: Iterable[Result]) -> dict:
    return {"experiments": [asdict(result) for result in results]}


def results_from_record(record: dict) -> list[Result]:
    return [Result(**_world_field(entry)) for entry in record.get("experiments", [])]


def _world_field(entry: dict) -> dict:
    """Records written before there were worlds have ``stress: bool``."""
    if "stress" not in entry:
        return entry
    entry = dict(entry)
    entry["world"] = "stress" if entry.pop("stress") else ""
    return entry


def _records(node) -> Iterable[dict]:
    if isinstance(node, list):
        for item in node:
            yield from _records(item)
    elif isinstance(node, dict):
        if "data" in node and "rev" in node:
            yield node
        for key in ("experiments", "revs"):
            yield from _records(node.get(key) or [])


def downstream(result: Result, checkpoint: str, metric: str) -> float | None:
    value = result.metrics.get(EVALUATION, {}).get(checkpoint, {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def arm(result: Result) -> str:
    """What must match for two experiments to be compared, besides their condition: the encoder build (its
    floating-point training differs between machines) and what each stage computed in."""
    return f"encoder {(encoder_build(result) or '?')[:8]}, precision {'/'.join(precisions(result))}"


def encoder_build(result: Result) -> str | None:
    return result.metrics.get(stage_metrics("encoder").as_posix(), {}).get("encoder", {}).get("id")


def precisions(result: Result) -> tuple[str, str, str]:
    """pretrain, finetune and evaluate's precision as recorded (fp32 is "no"); where an experiment predates the
    record, its params' value (those experiments all ran with "no")."""
    recorded = [result.metrics.get(stage_metrics(stage).as_posix(), {}).get("precision") for stage in ("pretrain", "finetune")]
    scored = {scores.get("precision") for scores in result.metrics.get(EVALUATION, {}).values() if isinstance(scores, dict)}
    recorded.append(next(iter(scored)) if len(scored) == 1 else None)
    params = [result.params.get(stage, {}).get("mixed_precision") for stage in ("pretrain", "finetune", "evaluate")]
    return tuple(str(found or _param_precision(param)) for found, param in zip(recorded, params))


def _param_precision(value: object) -> str:
    return "no" if value in (None, False, "no") else str(value)


def gap_metric(result: Result, column: str) -> float | None:
    """The gap of the text stage 1 trained on (raw text: the 'before' side); none for none/paired."""
    if CONDITIONS.get(result.condition, {}).get("pretrain.source") in ("none", "paired"):
        return None
    section, key = GAP[column]
    if result.condition == "raw":
        section = {"after": "before", "eval_after": "eval_before", "geometry_after": "geometry_before"}.get(section, section)
        key = "text_raw" if key == "text_aligned" else key
    value = result.metrics.get(REALIGN_METRICS.as_posix(), {}).get(section, {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Summary:
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else float("nan")

    def cell(self, digits: int = 3) -> str:
        if not self.values:
            return "—"
        sd = "" if math.isnan(self.sd) else f" ± {self.sd:.{digits}f}"
        return f"{self.mean:.{digits}f}{sd}"


def summarize(values: Iterable[float | None]) -> Summary:
    return Summary(tuple(v for v in values if v is not None and not math.isnan(v)))


def resolution(results: Iterable[Result], checkpoint: str, metric: str) -> float:
    """One image's worth of a ranked-probe accuracy (1 / the fewest images it was counted on); 0 otherwise."""
    found = re.fullmatch(r"rank_(\w+)_acc", metric)
    counts = [downstream(r, checkpoint, f"n_rank_{found.group(1)}") for r in results] if found else []
    counts = [n for n in counts if n]
    return 1.0 / min(counts) if counts else 0.0
