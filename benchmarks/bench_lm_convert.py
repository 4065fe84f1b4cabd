"""The bundled SmolLM2-135M: GGUF -> HF folder conversion, reload, greedy generation, and MLLM fwd+bwd.

Every step runs on the real model in this process: parse + de-quantize the GGUF, save the folder, reload it
(the path every later stage takes), check the reloaded logits match the GGUF model's, answer a text-only chat
prompt, and run a batch of visual-prefix conversations through the MLLM with the LM frozen (stage 1) and
trainable (stage 2). Generation and fwd+bwd are warmed up first, and fwd+bwd reports the best of a few runs,
since a shared machine makes single timings noisy.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/bench_lm_convert.py --out /tmp/smollm2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from revision.lm import bundled_gguf_path, load_gguf, load_lm
from revision.mllm import MLLM, MLLMConfig
from revision.visual_input import PooledInput

CAPTIONS = [
    "A red circle on a white background.", "A small blue square.", "Two green triangles side by side.",
    "A yellow rectangle.", "A purple star in the corner.", "An orange circle next to a gray square.",
    "A black shape on white.", "A brown triangle pointing up.",
]


@contextmanager
def timed(label: str):
    start = time.perf_counter()
    yield
    print(f"{label:42s} {time.perf_counter() - start:7.2f} s")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def convert_and_reload(out: Path) -> None:
    gguf = bundled_gguf_path()
    with timed("GGUF load + de-quantize (model + tokenizer)"):
        gguf_model, tokenizer = load_gguf(gguf)
    with timed("save_pretrained (safetensors + tokenizer)"):
        gguf_model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    with timed("reload from folder"):
        model, tokenizer = load_lm(out)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gap = (gguf_model(ids).logits - model(ids).logits).abs().max().item()
    print(f"folder {folder_mb(out):.0f} MiB, max |logit difference| GGUF vs reloaded {gap:.2e}")


def chat(folder: Path, max_new_tokens: int) -> None:
    model, tokenizer = load_lm(folder)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    print(f"greedy chat: {len(new_tokens)} tokens in {seconds:.2f} s ({len(new_tokens) / seconds:.1f} tok/s)")
    print(f"  -> {tokenizer.decode(new_tokens)!r}")


def fwd_bwd(model: MLLM, embeddings: torch.Tensor, conversations: list) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = model(embeddings, conversations).loss
    forward = time.perf_counter() - start
    loss.backward()
    return forward, time.perf_counter() - start


def mllm_steps(folder: Path, batch_size: int, embed_dim: int, visual_tokens: int, repeats: int) -> None:
    lm, tokenizer = load_lm(folder)
    torch.manual_seed(0)
    model = MLLM(lm, tokenizer, MLLMConfig(visual=PooledInput(embed_dim, visual_tokens)))
    captions = (CAPTIONS * (batch_size // len(CAPTIONS) + 1))[:batch_size]
    conversations = [[{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": c}]
                     for c in captions]
    embeddings = F.normalize(torch.randn(batch_size, embed_dim), dim=-1)
    batch = model.build_inputs(embeddings, conversations)
    print(f"MLLM batch {tuple(batch.inputs_embeds.shape)}, {int((batch.labels != -100).sum())} answer tokens")
    for lm_trainable in (False, True):
        model.lm.requires_grad_(lm_trainable)
        timings = [fwd_bwd(model, embeddings, conversations) for _ in range(1 + repeats)][1:]  # first: warm-up
        forward, total = min(timings, key=lambda t: t[1])
        print(f"fwd+bwd, LM {'trainable' if lm_trainable else 'frozen   '}: fwd {forward:.2f} s, "
              f"total {total:.2f} s (best of {repeats})")
    with timed("MLLM greedy caption (24 new tokens max)"):
        print(f"  -> {model.generate(embeddings[:1], max_new_tokens=24)[0]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where to write the folder (a temp dir if omitted)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--embed-dim", type=int, default=384)
    parser.add_argument("--visual-tokens", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd runs (the best is reported)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "smollm2"
        convert_and_reload(out)
        chat(out, args.max_new_tokens)
        mllm_steps(out, args.batch_size, args.embed_dim, args.visual_tokens, args.repeats)


if __name__ == "__main__":
    main()
