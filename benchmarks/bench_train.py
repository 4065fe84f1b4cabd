"""Training throughput: the pretrain/finetune code path versus a bare PyTorch loop on the same model and
batches, measured in the same run; then what ``model.visual_tokens`` costs per step.

    python benchmarks/bench_train.py --lm data/lm --steps 8 --batch-size 8
    python benchmarks/bench_train.py --lm data/lm --visual-tokens 1 4 16 64 576 --steps 2
    python benchmarks/bench_train.py --lm data/lm --precision --steps 6

``--precision`` times the stage loop (Accelerate at ``mixed_precision`` no and bf16, as the stages run it; stage 1
also with the frozen LM's weights stored in bf16) and prints each step's FLOPs (counted by PyTorch), the
FLOP/s achieved and its fraction of the matmul peak of the dtype the matrix products ran in, measured in the
same run, with the CPU features that decide ``auto``.

Stage 1 (LM frozen, projector trained) and stage 2 (projector + LoRA) are both measured. Batches are real
caption / SFT conversations from data/prepared when present; embeddings are random unit vectors (the cost
does not depend on their values).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from revision import precision as precisions
from revision.config import load_stage_config
from revision.mllm import add_lora, freeze_lm, new_mllm
from revision.objectives import LanguageModeling
from revision.train import LoopConfig, epoch_order, train
from revision.training_data import EmbeddingConversations, collate
from revision.visual_input import PooledInput


def conversations(prepared: Path, stage: int, n: int) -> list:
    if stage == 2 and (prepared / "sft.json").exists():
        return [r["conversations"] for r in json.loads((prepared / "sft.json").read_text())[:n]]
    caption = "A small red circle in the top left corner of the image."
    if stage == 1 and (prepared / "text_corpus.parquet").exists():
        import pandas as pd

        return [[{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": t}]
                for t in pd.read_parquet(prepared / "text_corpus.parquet")["text"][:n]]
    return [[{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": caption}]] * n


def build(args, stage: int, visual_tokens: int):
    cfg = load_stage_config("model").model_copy(update={"lm": "bundled", "visual_tokens": visual_tokens})
    visual = PooledInput(args.embed_dim, visual_tokens)
    model = new_mllm(args.lm, cfg, visual, {"id": "bench", "dim": args.embed_dim}, None, "causal")
    freeze_lm(model)
    if stage == 2:
        add_lora(model, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    return model


def dataset(args, stage: int, n: int | None = None) -> EmbeddingConversations:
    talks = conversations(args.prepared, stage, n or args.steps * args.batch_size)  # fewer where the data has fewer
    vectors = F.normalize(torch.randn(len(talks), args.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    return EmbeddingConversations(vectors.numpy(), talks)


def tokens_per_batch(model, data: EmbeddingConversations, batch_size: int) -> float:
    batch = collate([data[i] for i in range(batch_size)])
    return float(model.build_inputs(batch.vectors, batch.conversations).attention_mask.sum())


def time_stage_loop(
    args, stage: int, visual_tokens: int, precision: str = "no", lm_bf16: bool = False
) -> tuple[float, float]:
    model, data = build(args, stage, visual_tokens), dataset(args, stage)
    if lm_bf16:
        model.lm.to(torch.bfloat16)  # the frozen LM stored in bf16; the projector stays fp32
    objective = LanguageModeling(model, functools.partial(build, args, stage, visual_tokens))  # as the stages train it
    loop = LoopConfig(0, 1.0, args.batch_size, 1e-4, 0.0, 0.0, checkpoint_every=10**9)
    AcceleratorState._reset_state(True)  # Accelerate keeps one precision per process unless told to forget it
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(objective, data, collate, lambda m, b: m(b), loop, accelerator, Path(tmp), "bench",
              param_groups=objective.param_groups(loop.lr))
        seconds = time.perf_counter() - start
    return len(data) / seconds, tokens_per_batch(model, data, args.batch_size) * args.steps / seconds


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n x n matrix products in ``dtype``: what this machine can reach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def step_flops(args, stage: int, precision: str, lm_bf16: bool = False) -> float:
    """FLOPs of one training step (forward and backward of the first batch), as PyTorch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    model, data = build(args, stage, 4), dataset(args, stage)
    if lm_bf16:
        model.lm.to(torch.bfloat16)
    batch = collate([data[i] for i in range(args.batch_size)])
    with FlopCounterMode(display=False) as counter, precisions.autocast(precision, "cpu"):
        model(batch.vectors, batch.conversations).loss.backward()
    return float(counter.get_total_flops())


def cpu_features() -> str:
    flags = precisions.cpu_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{', '.join(shown) or 'none of avx2/avx512/amx'}; auto resolves to {precisions.resolve('auto', 'cpu')!r}"


def precision_table(args) -> None:
    """Per-step time of each stage in fp32 and bf16, with the FLOP/s and the fraction of the dtype's peak."""
    peaks = {"no": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"CPU features: {cpu_features()}")
    print(f"matmul peak (2048^2): fp32 {peaks['no'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s "
          f"({peaks['bf16'] / peaks['no']:.2f}x)")
    variants = [("fp32", "no", False), ("bf16 autocast", "bf16", False), ("bf16 autocast + bf16 LM", "bf16", True)]
    for stage in (1, 2):
        time_stage_loop(args, stage, 4)  # warm-up: first calls pay for lazy initialisation
        base = None
        for label, precision, lm_bf16 in variants:
            if lm_bf16 and stage == 2:
                continue  # stage 2 trains LoRA on the LM: its weights stay fp32
            samples_per_s, _ = time_stage_loop(args, stage, 4, precision, lm_bf16)
            step_s = args.batch_size / samples_per_s
            base = base or step_s
            flops = step_flops(args, stage, precision, lm_bf16)
            achieved = flops / step_s
            print(f"stage {stage} {label:24s}: {step_s:6.3f} s/step, {base / step_s:4.2f}x fp32 | "
                  f"{flops / 1e9:7.1f} GFLOP/step, {achieved / 1e9:6.1f} GFLOP/s = {achieved / peaks[precision]:.0%} "
                  f"of the {'bf16' if precision == 'bf16' else 'fp32'} peak")


def first_epoch_batches(data: EmbeddingConversations, batch_size: int, grouped: bool) -> list:
    """The training loop's first-epoch batches, in its order (grouped by length, as the stages train, or not)."""
    order = epoch_order(len(data), 0, 0, data.lengths() if grouped else None, batch_size)
    return [collate([data[i] for i in order[s : s + batch_size]]) for s in range(0, len(data), batch_size)]


def padding_overhead(model, batches: list) -> float:
    """Positions computed per real token: 1.0 means no padding."""
    masks = [model.build_inputs(batch.vectors, batch.conversations).attention_mask for batch in batches]
    return sum(m.numel() for m in masks) / sum(float(m.sum()) for m in masks)


def time_bare_loop(args, stage: int, visual_tokens: int, grouped: bool = False) -> tuple[float, float]:
    model, data = build(args, stage, visual_tokens), dataset(args, stage)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = first_epoch_batches(data, args.batch_size, grouped)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = model(batch.vectors, batch.conversations).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - start
    return len(data) / seconds, tokens_per_batch(model, data, args.batch_size) * args.steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", type=Path, default=Path("data/lm"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--visual-tokens", type=int, nargs="*", default=[])
    parser.add_argument("--group-samples", type=int, default=2400, help="samples whose padding is measured")
    parser.add_argument("--cpu", action="store_true", help="force CPU even where a GPU is present")
    parser.add_argument("--precision", action="store_true", help="fp32 against bf16 only (see the docstring)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.steps} steps, device "
          f"{'cuda' if torch.cuda.is_available() and not args.cpu else 'cpu'}")
    if args.precision:
        return precision_table(args)
    for stage in (1, 2):
        time_bare_loop(args, stage, 4)  # warm-up: first calls pay for lazy initialisation
        bare = time_bare_loop(args, stage, 4)
        loop = time_stage_loop(args, stage, 4)
        print(f"stage {stage}: train loop {loop[0]:6.2f} samples/s {loop[1]:7.1f} tok/s | bare loop "
              f"{bare[0]:6.2f} samples/s {bare[1]:7.1f} tok/s | ratio {loop[0] / bare[0]:.2f}")
    for stage in (1, 2):  # batches of similar length against shuffled ones, the same samples
        model, data = build(args, stage, 4), dataset(args, stage, args.group_samples)
        pads = [padding_overhead(model, first_epoch_batches(data, args.batch_size, g)) for g in (False, True)]
        shuffled, grouped = (time_bare_loop(args, stage, 4, g)[0] for g in (False, True))
        print(f"stage {stage}: positions per real token over {len(data)} samples: shuffled {pads[0]:.3f}, grouped "
              f"{pads[1]:.3f} | bare loop, first {args.steps} batches: grouped {grouped / shuffled:.2f}x shuffled")
    for k in args.visual_tokens:
        samples, tokens = time_bare_loop(args, 1, k)
        print(f"visual_tokens={k:4d}: stage-1 fwd+bwd {args.batch_size / samples:6.2f} s/batch, {tokens:7.1f} tok/s")


if __name__ == "__main__":
    main()
