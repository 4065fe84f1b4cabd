"""What Ross's loss costs per training step: samples/s of the same batches with and without the denoising loss,
for pooled input (ReVision + Ross) and grid input (the LLaVA recipe + Ross), in stage 1 (LM frozen) and stage 2
(LoRA), measured in the same run.

    python benchmarks/bench_ross.py --lm data/lm --steps 6 --batch-size 8 --repeats 3

Conversations are caption requests of realistic length; embeddings and Ross targets are random (the cost does
not depend on their values). The denoiser is the params.yaml `ross` block's.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from revision.config import load_stage_config
from revision.mllm import add_lora, freeze_lm, new_mllm
from revision.objectives import Batch, LanguageModeling, Objective
from revision.ross import Denoiser, Ross, TargetTokenizer
from revision.visual_input import GridInput, PooledInput

CAPTION = "A small red circle in the top left corner of the image, on a plain white background."


def build_mllm(args, stage: int, grid: bool):
    torch.manual_seed(0)
    update = {"lm": "bundled", "visual_input": "grid" if grid else "pooled", "grid": args.grid, "visual_tokens": args.grid**2}
    cfg = load_stage_config("model").model_copy(update=update)
    visual = GridInput(args.grid, args.channels) if grid else PooledInput(args.embed_dim, args.grid**2)
    model = freeze_lm(new_mllm(args.lm, cfg, visual, {"id": "bench", "dim": args.embed_dim}, None, "causal"))
    if stage == 2:
        add_lora(model, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])
    return model


def build(args, stage: int, grid: bool, ross: bool) -> Objective:
    """The objective the stage trains: the plain LM loss, or Ross's."""
    rebuild = functools.partial(build_mllm, args, stage, grid)
    model = rebuild()
    if not ross:
        return LanguageModeling(model, rebuild)
    ross_cfg = load_stage_config("ross")
    shape = {"target_dim": args.target_dim, "hidden_size": model.projector.hidden_size, "grid": args.grid,
             "width": ross_cfg.width, "depth": ross_cfg.depth, "heads": ross_cfg.heads}
    settings = {**ross_cfg.model_dump(), "denoiser": shape}
    return Ross(model, rebuild, Denoiser(**shape), settings, torch.zeros(args.target_dim), torch.ones(args.target_dim))


def batches(args, grid: bool) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    width = args.grid**2 * args.channels if grid else args.embed_dim
    talk = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": CAPTION}]
    return [
        Batch(F.normalize(torch.randn(args.batch_size, width, generator=g), dim=-1), [talk] * args.batch_size,
              torch.randn(args.batch_size, args.grid**2, args.target_dim, generator=g))
        for _ in range(args.steps)
    ]


def samples_per_s(model: Objective, data: list[Batch]) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    for batch in data:
        model(batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return sum(len(batch.conversations) for batch in data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", type=Path, default=Path("data/lm"))
    parser.add_argument("--embed-dim", type=int, default=256, help="pooled embedding dim")
    parser.add_argument("--channels", type=int, default=1280, help="grid channels per cell (EfficientNet-Lite0)")
    parser.add_argument("--grid", type=int, default=4, help="cells per side = Ross's target grid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.target_dim = TargetTokenizer(args.grid).dim
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.steps} steps, {args.grid}x{args.grid} "
          f"visual tokens, Ross targets of {args.target_dim} channels, repeat {load_stage_config('ross').repeat}")
    for stage in (1, 2):
        for grid in (False, True):
            data, models = batches(args, grid), [build(args, stage, grid, ross) for ross in (False, True)]
            samples_per_s(models[0], data[:2])  # warm-up: lazy initialisation
            # interleaved, best of --repeats: a busy machine slows single runs, not the fastest of several
            runs = [[samples_per_s(model, data) for model in models] for _ in range(args.repeats)]
            plain, ross = (max(run[i] for run in runs) for i in (0, 1))
            print(f"stage {stage}, {'grid  ' if grid else 'pooled'} input: without Ross {plain:6.2f} samples/s | with "
                  f"Ross {ross:6.2f} samples/s | Ross costs {plain / ross - 1:+.0%} time per step")


if __name__ == "__main__":
    main()
