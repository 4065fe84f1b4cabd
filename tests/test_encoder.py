"""The LiT dual encoder on tiny towers: training lowers the loss, save/load is exact, identity tracks weights."""

from __future__ import annotations

import torch

from revision.config import EncoderConfig, LitConfig
from revision.contrastive import train_heads
from revision.encoders import build_encoder, load_encoder, save_encoder

TINY = EncoderConfig(lit=LitConfig(text_tower="tiny", image_tower="tiny", image_size=16, embed_dim=8, epochs=15, batch_size=16, lr=0.01))


def _paired_features(n=64, classes=4):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    text = torch.randn(classes, 32, generator=g)[labels] + 0.1 * torch.randn(n, 32, generator=g)
    image = torch.randn(classes, 32, generator=g)[labels] + 0.1 * torch.randn(n, 32, generator=g)
    return text, image


def test_contrastive_training_lowers_the_loss():
    encoder = build_encoder(TINY)
    text, image = _paired_features()
    history = train_heads(encoder, text, image, TINY.lit, seed=0)
    assert history[-1] < 0.7 * history[0]


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    encoder = build_encoder(TINY)
    train_heads(encoder, *_paired_features(), TINY.lit, seed=0)
    identity = save_encoder(encoder, TINY, tmp_path / "enc")
    loaded, loaded_identity = load_encoder(tmp_path / "enc")
    assert loaded_identity == identity and identity["dim"] == 8
    texts = ["a red circle", "a pullover"]
    torch.testing.assert_close(loaded.encode_text(texts), encoder.encode_text(texts), rtol=0, atol=0)


def test_identity_changes_with_the_weights(tmp_path):
    encoder = build_encoder(TINY)
    first = save_encoder(encoder, TINY, tmp_path / "a")
    train_heads(encoder, *_paired_features(), TINY.lit, seed=0)
    assert save_encoder(encoder, TINY, tmp_path / "b")["id"] != first["id"]
