"""The LiT dual encoder on tiny towers: training lowers the loss, save/load is exact, identity tracks weights."""

from __future__ import annotations

import pytest
import torch

from revision.config import EncoderConfig
from revision.contrastive import pairs_gap, train_heads
from revision.encoders import build_encoder, load_encoder, save_encoder
from tests.helpers import committed_params

DEFAULT = EncoderConfig.model_validate(committed_params()["encoder"])  # not a user's experiment in the workspace
TINY_LIT = {"text_tower": "tiny", "image_tower": "tiny", "image_size": 16, "embed_dim": 8, "epochs": 15, "batch_size": 16, "lr": 0.01}
TINY = DEFAULT.model_copy(update={"lit": DEFAULT.lit.model_copy(update=TINY_LIT)})


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


def _two_cones(n=256, classes=8, seed=0):
    """Paired features where each tower sits in its own cone (a shared offset), as real towers do."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    text = 3 + torch.randn(classes, 32, generator=g)[labels] + 0.3 * torch.randn(n, 32, generator=g)
    image = -3 + torch.randn(classes, 32, generator=g)[labels] + 0.3 * torch.randn(n, 32, generator=g)
    return text, image


@pytest.mark.parametrize("seed", [0, 1])
def test_a_fixed_low_temperature_keeps_the_modality_gap_a_learned_one_closes(seed):
    """The mechanism behind encoder.lit.learn_logit_scale: same features, same heads, only the temperature differs."""
    gaps = {}
    for learn, scale in [(True, 1 / 0.07), (False, 100.0)]:
        update = {**TINY_LIT, "embed_dim": 16, "epochs": 30, "batch_size": 64, "lr": 0.003, "head_layers": 1,
                  "learn_logit_scale": learn, "logit_scale": scale}
        cfg = DEFAULT.model_copy(update={"lit": DEFAULT.lit.model_copy(update=update), "seed": seed})
        encoder = build_encoder(cfg)
        history = train_heads(encoder, *_two_cones(seed=seed), cfg.lit, seed=seed)
        assert history[-1] < 0.5 * history[0]  # both learn the pairing
        gaps[learn] = pairs_gap(encoder, *_two_cones(seed=seed))
        if not learn:
            assert encoder.logit_scale.exp().item() == pytest.approx(100.0)  # held, not trained
    assert gaps[True] < 0.3 and gaps[False] > 1.0, gaps


def test_mlp_heads_have_the_configured_depth():
    encoder = build_encoder(TINY.model_copy(update={"lit": TINY.lit.model_copy(update={"head_layers": 3})}))
    linears = [m for m in encoder.text_head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and linears[-1].out_features == TINY.lit.embed_dim


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


def test_open_clip_checkpoint_on_disk_is_used_as_is(tmp_path):
    """kind=open_clip loads a local checkpoint (here a tiny random architecture) and trains nothing."""
    import json

    import open_clip
    from PIL import Image
    from safetensors.torch import save_file

    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-clip.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "tiny-clip.json")
    weights = {k: v.contiguous() for k, v in open_clip.create_model("tiny-clip").state_dict().items()}
    save_file(weights, str(tmp_path / "clip.safetensors"))
    cfg = DEFAULT.model_copy(update={"kind": "open_clip", "open_clip_model": "tiny-clip", "checkpoint": str(tmp_path / "clip.safetensors"),
                                     "open_clip_config": str(tmp_path / "tiny-clip.json")})
    encoder = build_encoder(cfg)
    identity = save_encoder(encoder, cfg, tmp_path / "enc")
    loaded, loaded_identity = load_encoder(tmp_path / "enc")
    assert loaded_identity == identity and identity["dim"] == 16 and identity["kind"] == "open_clip"
    assert not (tmp_path / "enc" / "heads.safetensors").exists()
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    torch.testing.assert_close(loaded.encode_images([image]), encoder.encode_images([image]))
    text = loaded.encode_text(["a red square"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(text, encoder.encode_text(["a red square"]))
