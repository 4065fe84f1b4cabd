"""What evaluate's model calls cost in fp32 and in bf16 autocast, measured in the same run: teacher-forced
scoring (caption NLL, image_gain and the ranked probes are all this call) and greedy generation (captions and
answers), with the FLOP/s of the scoring and its fraction of the dtype's matmul peak.

    python benchmarks/bench_evaluate.py --checkpoint data/finetune --images 64

The checkpoint is scored on the first ``--images`` eval captions of data/prepared, each with a random unit
embedding (the cost does not depend on its values); generation runs ``--max-new-tokens`` steps for every image
(end of sequence is ignored, so both precisions generate the same number of tokens).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from bench_train import cpu_features, matmul_peak

from revision import precision as precisions
from revision.checkpoints import checkpoint_config, load_mllm
from revision.config import load_stage_config
from revision.evaluate import caption_nlls, generate_all
from revision.mllm import new_mllm
from revision.visual_input import PooledInput


def captions(prepared: Path, n: int) -> list[str]:
    table = pd.read_parquet(prepared / "eval.parquet", columns=["captions"])
    return [str(row[0]) for row in table["captions"][:n]]


def scored_model(args):
    """The checkpoint, or where there is none a new model on ``--lm`` (the cost does not depend on the weights)."""
    if (args.checkpoint / "mllm.json").exists():
        if checkpoint_config(args.checkpoint).visual.kind != "pooled":
            raise SystemExit(f"{args.checkpoint}: a pooled-input checkpoint is needed")
        return load_mllm(args.checkpoint).eval()
    print(f"no checkpoint at {args.checkpoint}: a new model on {args.lm}")
    cfg = load_stage_config("model").model_copy(update={"lm": "bundled"})
    visual = PooledInput(256, cfg.visual_tokens)
    return new_mllm(args.lm, cfg, visual, {"id": "bench", "dim": 256}, None, "causal").eval()


def timed(work) -> tuple[float, object]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("data/finetune"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--lm", type=Path, default=Path("data/lm"), help="for a new model where there is no checkpoint")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    model = scored_model(args)
    model.config.max_length = None
    model.lm.generation_config.eos_token_id = None  # the same number of new tokens in both precisions
    texts = captions(args.prepared, args.images)
    dim = model.config.visual.dim
    vectors = F.normalize(torch.randn(len(texts), dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    peaks = {"no": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"{torch.get_num_threads()} threads, {len(texts)} images, batch {args.batch_size}; CPU features: {cpu_features()}")
    print(f"matmul peak (2048^2): fp32 {peaks['no'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    from torch.utils.flop_counter import FlopCounterMode

    base = {}
    for label, precision in (("fp32", "no"), ("bf16", "bf16")):
        with precisions.autocast(precision, "cpu"):
            caption_nlls(model, vectors[: args.batch_size], texts[: args.batch_size], args.batch_size)  # warm-up
            score_s, (sums, counts) = timed(lambda: caption_nlls(model, vectors, texts, args.batch_size))
            with FlopCounterMode(display=False) as counter:
                caption_nlls(model, vectors[: args.batch_size], texts[: args.batch_size], args.batch_size)
            flops = counter.get_total_flops() * len(texts) / min(args.batch_size, len(texts))
            gen_s, _ = timed(lambda: generate_all(model, vectors, [None] * len(texts), args.max_new_tokens, args.batch_size))
        base.setdefault("score", score_s)
        base.setdefault("generate", gen_s)
        nll = float(sums.sum() / counts.sum())
        print(f"{label}: scoring {score_s:6.2f} s ({base['score'] / score_s:4.2f}x fp32), {flops / score_s / 1e9:6.1f} "
              f"GFLOP/s = {flops / score_s / peaks[precision]:.0%} of peak, caption NLL {nll:.4f} | generation "
              f"{gen_s:6.2f} s ({base['generate'] / gen_s:4.2f}x fp32, {len(texts) * args.max_new_tokens / gen_s:5.1f} tok/s)")


if __name__ == "__main__":
    main()
