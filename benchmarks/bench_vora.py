"""What VoRA costs against the encoder path, measured in the same run on the same images.

Per image at inference (tokens the LM reads, ms for reading the image and writing a caption of fixed length):
the encoder with grid tokens (EfficientNet-Lite0 at 128 px, 4x4 cells, grid projector, causal LM) and VoRA
(no encoder: pixels, patch embedding, the LM with bidirectional image attention and cached decoding). Per
training step in stage 1 (samples/s): the encoder with grid tokens (projector only learns; its features
computed beforehand, as the grid stage does) and VoRA (vision LoRA + patch embedding, with and without the
distillation teacher).

    python benchmarks/bench_vora.py --lm data/lm --images 16 --new-tokens 16 --repeats 3

Images are random pixels and captions a fixed sentence (the cost does not depend on their values); the LM is
forced to write exactly --new-tokens tokens. VoRA's settings are the params.yaml `vora` block's.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from revision.attention import greedy_decode
from revision.config import load_stage_config
from revision.feature_maps import GridFeatures
from revision.mllm import freeze_lm, new_mllm
from revision.objectives import Batch, LanguageModeling
from revision.visual_input import GridInput, PixelRows, PixelsInput, pixel_identity
from revision.vora import Vora, add_vision_lora

CAPTION = "A small red circle in the top left corner of the image, on a plain white background."


def models(args):
    vora_cfg = load_stage_config("vora")
    model_cfg = load_stage_config("model")
    torch.manual_seed(0)
    grid_cfg = model_cfg.model_copy(update={"lm": "bundled", "visual_input": "grid", "grid": 4})
    features = GridFeatures(_lit(), 4)
    grid_input = GridInput(4, features.channels)
    grid = freeze_lm(new_mllm(args.lm, grid_cfg, grid_input, {"id": "bench", "dim": features.dim}, None, "causal"))
    return features, grid, PixelRows(vora_cfg.image_size), vora_mllm(args, model_cfg, vora_cfg), vora_cfg


def vora_mllm(args, model_cfg, vora_cfg):
    """A pixels model as VoRA's stage 1 trains it: the LM frozen, vision LoRA in its first blocks."""
    pixels_cfg = model_cfg.model_copy(update={"lm": "bundled", "visual_input": "pixels"})
    visual = PixelsInput(vora_cfg.image_size, vora_cfg.patch)
    vora = freeze_lm(new_mllm(args.lm, pixels_cfg, visual, pixel_identity(vora_cfg.image_size), None, vora_cfg.attention))
    return add_vision_lora(vora, vora_cfg)


def _lit():
    from revision.encoders import LitEncoder

    cfg = load_stage_config("encoder").lit
    return LitEncoder(cfg)


@torch.no_grad()
def caption_ms(model, reader, images: list, new_tokens: int) -> float:
    """ms per image to read ``images`` and write ``new_tokens`` tokens for each (one batch)."""
    start = time.perf_counter()
    rows = reader.encode_images(images)
    prompts = [model._pieces(model.conversation(None), generation_prompt=True) for _ in images]
    batch = model._collate(prompts, model._project(rows), pad_left=True)
    if model.config.image_attention == "bidirectional":
        greedy_decode(model.lm, batch.inputs_embeds, batch.attention_mask, model._attention(batch), new_tokens, -1, 0)
    else:
        model.lm.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, do_sample=False,
                          min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    return (time.perf_counter() - start) * 1000 / len(images)


def samples_per_s(model, rows: torch.Tensor, steps: int) -> float:
    talk = [{"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": CAPTION}]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        model(Batch(rows, [talk] * rows.shape[0]))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps * rows.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", type=Path, default=Path("data/lm"))
    parser.add_argument("--images", type=int, default=16, help="images captioned together")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="training batch")
    parser.add_argument("--steps", type=int, default=4, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    features, grid, reader, vora, vora_cfg = models(args)
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(args.images)]
    print(f"{torch.get_num_threads()} threads; {args.images} images, {args.new_tokens} new tokens each")
    readers = {"encoder, grid tokens": (grid, features), "VoRA (pixels)": (vora, reader)}
    caption_ms(grid, features, images[:2], 2)  # warm-up
    times = {name: min(caption_ms(m, r, images, args.new_tokens) for _ in range(args.repeats)) for name, (m, r) in readers.items()}
    base = times["encoder, grid tokens"]
    for name, (model, _) in readers.items():
        print(f"inference {name:22s}: {model.config.visual.tokens:3d} image tokens, {times[name]:7.1f} ms/image "
              f"({times[name] / base:.2f}x the encoder path)")
    rows_grid = F.normalize(features.encode_images(images[: args.batch_size]), dim=-1)
    rows_pixels = reader.encode_images(images[: args.batch_size])
    rebuild_vora = functools.partial(vora_mllm, args, load_stage_config("model"), vora_cfg)
    no_distill = vora_cfg.model_copy(update={"distill_weight": 0.0})
    trained = {  # the objectives stage 1 trains
        "encoder, grid tokens (projector)": (LanguageModeling(grid, lambda: grid), rows_grid),
        "VoRA, LoRA + distillation": (Vora(vora, rebuild_vora, vora_cfg), rows_pixels),
        "VoRA, LoRA, no distillation": (Vora(vora, rebuild_vora, no_distill), rows_pixels),
    }
    rates = {name: max(samples_per_s(m, rows, args.steps) for _ in range(args.repeats)) for name, (m, rows) in trained.items()}
    base = rates["encoder, grid tokens (projector)"]
    for name, rate in rates.items():
        print(f"stage 1 {name:34s}: {rate:6.2f} samples/s ({base / rate:.2f}x the encoder path's time per step)")


if __name__ == "__main__":
    main()
