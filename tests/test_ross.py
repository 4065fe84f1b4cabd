"""Ross's denoiser and loss: it starts at loss 1, learns, reads its conditioning, and follows the cosine schedule."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from revision.checkpoints import load_mllm, save_mllm
from revision.config import RossConfig
from revision.conversations import IMAGE_SLOT_ID
from revision.errors import InputError
from revision.mllm import freeze_lm
from revision.ross import (
    ROSS_DIR,
    STEPS,
    Denoiser,
    Ross,
    TargetTokenizer,
    attach_ross,
    channel_stats,
    denoising_loss,
    noise_schedule,
    sincos_positions,
    standardize,
)
from revision.training_data import EmbeddingConversations, collate
from tests.helpers import tiny_mllm

TARGET_DIM, HIDDEN, GRID = 8, 24, 2


def denoiser(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(TARGET_DIM, HIDDEN, GRID, width=32, depth=2, heads=4)


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states and targets that are a fixed function of them: the conditioning says what to reconstruct."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, GRID * GRID, HIDDEN, generator=g)
    mixing = torch.randn(HIDDEN, TARGET_DIM, generator=torch.Generator().manual_seed(99)) / math.sqrt(HIDDEN)
    return hidden @ mixing, hidden


def test_cosine_schedule_is_the_formula():
    s = 0.008
    f = lambda t: math.cos((t / STEPS + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f(i + 1) / f(0) for i in range(STEPS)])
    got = noise_schedule().alphas_cumprod
    assert got.shape == (STEPS,)
    assert torch.allclose(got[:990], expected[:990].float(), rtol=1e-4, atol=1e-6)  # beta is capped at 0.999 at the end
    assert got[0] > 0.999 and got[-1] < 1e-4 and bool((got[1:] < got[:-1]).all())


def test_first_loss_is_about_one_because_the_output_starts_at_zero():
    model, (targets, hidden) = denoiser(), batch(64)
    noisy = torch.randn_like(targets)
    assert torch.equal(model(noisy, torch.randint(0, STEPS, (64,)), hidden), torch.zeros_like(targets))
    loss = denoising_loss(model, noise_schedule(), targets, hidden, repeat=4, generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.0, abs=0.05)


def train(model: Denoiser, steps: int, n: int = 16) -> list[float]:
    schedule, (targets, hidden) = noise_schedule(), batch(n)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        loss = denoising_loss(model, schedule, targets, hidden, repeat=2, generator=torch.Generator().manual_seed(step % 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_loss_falls_on_a_fixed_batch():
    losses = train(denoiser(), 60)
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:4]) / 4


def test_shuffled_conditioning_raises_the_loss_after_training():
    model, schedule = denoiser(), noise_schedule()
    train(model, 60)
    targets, hidden = batch(16)
    shuffled = hidden[torch.roll(torch.arange(16), 1)]

    def loss_with(h):
        with torch.no_grad():
            return denoising_loss(model, schedule, targets, h, repeat=8, generator=torch.Generator().manual_seed(123)).item()

    assert loss_with(shuffled) > 1.2 * loss_with(hidden)


def test_the_loss_trains_what_made_the_hidden_states():
    model, schedule, (targets, hidden) = denoiser(), noise_schedule(), batch(8)
    train(model, 3, n=8)  # past zero-init: the gradient flows back through the blocks
    hidden = hidden.clone().requires_grad_(True)
    denoising_loss(model, schedule, targets, hidden, repeat=2, generator=torch.Generator().manual_seed(0)).backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_positions_tell_the_tokens_apart_and_refuse_odd_widths():
    positions = sincos_positions(4, 16)
    assert positions.shape == (16, 16) and len({tuple(p.tolist()) for p in positions}) == 16
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_positions(4, 18)


# ---------------------------------------------------------------- targets


def images(n: int, size: int = 64, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def feature_targets() -> TargetTokenizer:
    return TargetTokenizer(grid=4)


def test_feature_targets_are_one_frozen_token_per_visual_token(feature_targets):
    tokens = feature_targets(images(3))
    assert tokens.shape == (3, 16, feature_targets.dim) and feature_targets.dim == 4 * 40  # EfficientNet stride 8: 40 ch
    assert not any(p.requires_grad for p in feature_targets.parameters())
    feature_targets.train()
    assert torch.equal(feature_targets(images(3)), tokens)  # frozen batch norm, no dropout: the same targets
    assert not torch.allclose(tokens[0], tokens[1])


def test_each_token_folds_its_own_2x2_window_of_the_stride8_map(feature_targets):
    image = images(1)
    x = feature_targets.tower.stem(feature_targets.tower.preprocess(image))
    for block in feature_targets.tower.model._blocks[: feature_targets.blocks]:
        x = block(x)
    assert x.shape[-2:] == (8, 8)  # 64 px / 8
    tokens = feature_targets(image)[0]
    row, col = 2, 1  # token 9 covers rows 4-5, columns 2-3 of the map
    window = x[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
    assert torch.allclose(tokens[row * 4 + col].reshape(40, 2, 2), window, atol=1e-6)


def test_pixel_targets_are_8x8_patches():
    state = torch.random.get_rng_state()
    tokenizer = TargetTokenizer(grid=2, kind="pixels")
    assert torch.equal(torch.random.get_rng_state(), state)  # building it leaves the caller's seed alone
    image = images(1, size=16)
    tokens = tokenizer(image)
    assert tokens.shape == (1, 4, 3 * 64)
    pixels = tokenizer.tower.preprocess(image)[0]
    assert torch.allclose(tokens[0, 1].reshape(3, 8, 8), pixels[:, :8, 8:])
    with pytest.raises(ValueError, match="'features' or 'pixels'"):
        TargetTokenizer(grid=2, kind="vae")


def test_standardized_targets_have_zero_mean_and_unit_sd_per_channel():
    tokens = torch.randn(10, 4, 6) * torch.arange(1, 7) + 3
    mean, std = channel_stats(tokens)
    flat = standardize(tokens, mean, std).reshape(-1, 6)
    assert torch.allclose(flat.mean(0), torch.zeros(6), atol=1e-5) and torch.allclose(flat.std(0), torch.ones(6), atol=1e-5)


# ---------------------------------------------------------------- Ross as a training objective

ROSS = RossConfig(weight=1.0, target="pixels", width=32, depth=1, heads=4, repeat=2, lr_scale=1.0)
CAPTION = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red circle"}]


def samples_with_images(folder, n: int = 6, dim: int = 16) -> EmbeddingConversations:
    """``n`` samples whose images are PNG files in ``folder``, as the stages hand them to ``attach_ross``."""
    paths = []
    for i, image in enumerate(images(n, size=16)):
        paths.append((i, folder / f"{i}.png"))
        image.save(paths[-1][1])
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return EmbeddingConversations(vectors, [CAPTION] * n, paths)


def pooled_mllm(lm_dir, visual_tokens: int = 4):
    """A stage-1 MLLM (LM frozen) reading 16-dim embeddings as ``visual_tokens`` tokens."""
    return freeze_lm(tiny_mllm(lm_dir, embed_dim=16, visual_tokens=visual_tokens, encoder={"name": "test", "dim": 16}))


@pytest.fixture
def ross_model(tiny_lm_dir, tmp_path) -> tuple[Ross, EmbeddingConversations]:
    samples = samples_with_images(tmp_path)
    build = functools.partial(pooled_mllm, tiny_lm_dir)
    return attach_ross(build(), build, samples, ROSS, tmp_path / "manifest.json"), samples


def wake(denoiser: Denoiser) -> None:
    """Give the zero-initialised layers small weights: at init the output ignores its conditioning (adaLN-Zero),
    so no gradient reaches the hidden states until the denoiser has taken a step."""
    torch.manual_seed(1)
    for layer in [block.modulation for block in denoiser.blocks] + [denoiser.final_modulation, denoiser.out]:
        torch.nn.init.normal_(layer.weight, std=0.05)


def test_each_sample_gets_one_standardised_target_per_visual_token(ross_model):
    model, samples = ross_model
    assert samples.targets.shape == (6, model.mllm.config.visual.tokens, 3 * 64)
    flat = samples.targets.reshape(-1, samples.targets.shape[-1])
    assert torch.allclose(flat.mean(0), torch.zeros(flat.shape[1]), atol=1e-4)
    losses = model(collate([samples[i] for i in range(3)]))
    assert set(losses) == {"loss", "lm_loss", "denoise_loss"}
    assert losses["denoise_loss"].item() == pytest.approx(1.0, abs=0.15)  # zero-init output: the noise's own variance
    assert torch.allclose(losses["loss"], losses["lm_loss"] + losses["denoise_loss"])


def test_denoising_gradient_reaches_the_lm_states_at_visual_positions_only(ross_model):
    model, samples = ross_model
    wake(model.denoiser)
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["final"] = output

    model.mllm.lm.model.norm.register_forward_hook(keep)  # the LM's final hidden states
    batch = collate([samples[i] for i in range(2)])
    model(batch)["denoise_loss"].backward()
    moved = captured["final"].grad.abs().sum(-1) > 0
    visual = model.mllm.build_inputs(batch.vectors, batch.conversations).input_ids == IMAGE_SLOT_ID
    assert visual.sum() == 2 * 4 and torch.equal(moved, visual)
    # stage 1: the LM is frozen, and the loss still trains the projector, through it
    assert all(p.grad is None for p in model.mllm.lm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mllm.projector.parameters())


def test_ross_needs_square_visual_tokens_and_images(tiny_lm_dir, tmp_path):
    build = functools.partial(pooled_mllm, tiny_lm_dir, visual_tokens=3)
    mllm = build()
    with pytest.raises(InputError, match="must be a square"):
        attach_ross(mllm, build, samples_with_images(tmp_path), ROSS, tmp_path / "m.json")
    text_only = EmbeddingConversations(np.zeros((2, 16), np.float32), [CAPTION] * 2)
    with pytest.raises(InputError, match="m.json: Ross needs the image of every sample"):
        attach_ross(mllm, build, text_only, ROSS, tmp_path / "m.json")


def test_the_denoiser_is_saved_beside_the_checkpoint_and_never_used_to_answer(ross_model, tmp_path):
    model, samples = ross_model
    wake(model.denoiser)
    with_ross, without = tmp_path / "with", tmp_path / "without"
    with_ross.mkdir(), without.mkdir()
    model.save(with_ross)
    save_mllm(model.mllm, without)
    assert (with_ross / ROSS_DIR / "denoiser.safetensors").exists() and not (without / ROSS_DIR).exists()
    vectors = samples.vectors[:3]
    answers = [load_mllm(folder).generate(vectors, max_new_tokens=6) for folder in (with_ross, without)]
    assert answers[0] == answers[1]
    # stage 2 continues the saved denoiser, with the targets standardised as stage 1 did
    (tmp_path / "sft").mkdir()
    fresh = samples_with_images(tmp_path / "sft")
    build = functools.partial(load_mllm, with_ross)
    continued = attach_ross(build(), build, fresh, ROSS, tmp_path / "sft.json", previous=with_ross)
    for name, value in model.denoiser.state_dict().items():
        assert torch.equal(continued.denoiser.state_dict()[name], value), name
    assert torch.equal(continued.target_mean, model.target_mean) and torch.equal(continued.target_std, model.target_std)
    wider = ROSS.model_copy(update={"width": 64})
    other = attach_ross(build(), build, fresh, wider, tmp_path / "sft.json", previous=with_ross)
    assert torch.count_nonzero(other.denoiser.out.weight) == 0  # another shape: a fresh denoiser


def test_rebuild_makes_a_fresh_ross_of_the_same_shape_that_takes_the_trained_state(ross_model):
    model, _ = ross_model
    wake(model.denoiser)
    rebuilt = model.rebuild()  # what train_and_save loads the gathered state into
    assert isinstance(rebuilt, Ross) and rebuilt.mllm is not model.mllm and rebuilt.settings == model.settings
    assert torch.count_nonzero(rebuilt.denoiser.out.weight) == 0  # a fresh denoiser, not the trained one
    rebuilt.load_state_dict(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name


def test_a_missing_target_image_names_the_manifest_and_row(tiny_lm_dir, tmp_path):
    samples = samples_with_images(tmp_path)
    (tmp_path / "4.png").unlink()
    build = functools.partial(pooled_mllm, tiny_lm_dir)
    with pytest.raises(InputError, match=r"sft\.json: row 4: image file not found"):
        attach_ross(build(), build, samples, ROSS, tmp_path / "sft.json")
    assert samples.targets is None  # nothing half-attached
