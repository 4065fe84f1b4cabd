"""What ``model.visual_tokens`` costs and whether it buys anything.

For each k, a stage-1 run (LM frozen, projector trained on aligned text embeddings, same samples, seed and
steps) is timed, then scored zero-shot on real images: the mean per-token NLL of each eval image's first
reference caption given its *image* embedding. Needs the default pipeline's data (dvc repro pretrain).

    python benchmarks/bench_visual_tokens.py --visual-tokens 1 4 16 --samples 800
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from accelerate import Accelerator

from revision.config import load_stage_config
from revision.embedding_sets import EmbeddingSet
from revision.mllm import freeze_lm, new_mllm
from revision.train import LoopConfig, train
from revision.training_data import caption_samples, collate
from revision.visual_input import PooledInput


@torch.no_grad()
def eval_caption_nll(model, data, batch_size: int = 16) -> float:
    model.eval()
    batches = [collate([data[j] for j in range(i, min(i + batch_size, len(data)))]) for i in range(0, len(data), batch_size)]
    losses = [model(batch.vectors, batch.conversations).loss.item() for batch in batches]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visual-tokens", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    data = Path("data")
    text = caption_samples(EmbeddingSet(data / "realign" / "aligned_text"), pd.read_parquet(data / "prepared" / "text_corpus.parquet"),
                           "text", data / "prepared" / "text_corpus.parquet", args.samples, seed=0)
    evals = pd.read_parquet(data / "prepared" / "eval.parquet").head(args.eval_images)
    evals = evals.assign(caption=[c[0] for c in evals["captions"]])
    images = EmbeddingSet(data / "embeddings" / "eval_images")
    real = caption_samples(images, evals, "caption", data / "prepared" / "eval.parquet", None, seed=0)
    print(f"stage 1 on {len(text)} aligned-text samples, batch {args.batch_size}; zero-shot NLL on {len(real)} real eval images")
    model_cfg = load_stage_config("model")
    for k in args.visual_tokens:
        torch.manual_seed(0)
        visual = PooledInput(images.encoder["dim"], k)
        model = freeze_lm(new_mllm(data / "lm", model_cfg, visual, images.encoder, None, "causal"))
        loop = LoopConfig(0, 1.0, args.batch_size, 1e-3, 0.0, 0.05, checkpoint_every=10**9)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            loss = lambda m, b: m(b.vectors, b.conversations).loss  # noqa: E731
            _, history = train(model, text, collate, loss, loop, Accelerator(cpu=True), Path(tmp), "k")
            seconds = time.perf_counter() - start
        tail = sum(r["loss"] for r in history[-10:]) / len(history[-10:])
        print(f"visual_tokens={k:3d}: {seconds / len(history):5.2f} s/step, last-10 train loss {tail:.3f}, "
              f"zero-shot real-image caption NLL {eval_caption_nll(model, real):.3f}")


if __name__ == "__main__":
    main()
