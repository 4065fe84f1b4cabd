"""``revision chat``: ask a trained checkpoint about any image file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from revision import layout

NAME = "chat"
HELP = (
    "Answer a question about an image (or caption it when no question is given) with a trained checkpoint: "
    "the image goes through the checkpoint's own encoder (a VoRA checkpoint reads its pixels), its embedding "
    "straight into the projector. Works with "
    "stage-1-only checkpoints (data/pretrain) and finished ones (data/finetune)."
)


def main(
    image: Path = typer.Option(..., help="any image file (PNG, JPEG, ...)"),
    question: Optional[str] = typer.Option(None, help="a question; omit it for a caption"),
    checkpoint: Path = typer.Option(layout.FINETUNE, help="MLLM folder from pretrain or finetune"),
    encoder_dir: Path = typer.Option(layout.ENCODER, help="the encoder the checkpoint was trained on (not read for VoRA)"),
    max_new_tokens: int = typer.Option(48, help="longest answer in tokens"),
) -> None:
    from revision.checkpoints import load_mllm
    from revision.images import read_image

    model = load_mllm(checkpoint)
    fix = "pass the matching --encoder-dir"
    reader = model.config.visual.reader(encoder_dir, model.config.encoder, f"{checkpoint} (trained)", fix)
    vectors = reader.encode_images([read_image(image, str(image))])
    typer.echo(model.generate(vectors, [question], max_new_tokens=max_new_tokens)[0])
