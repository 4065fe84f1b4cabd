"""The shared training loop: it learns, and a run interrupted after a checkpoint resumes to the same result."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from revision.train import GROUP_WINDOW, LoopConfig, epoch_order, train

CFG = LoopConfig(seed=0, epochs=3, batch_size=8, lr=0.1, weight_decay=0.0, warmup_ratio=0.1, checkpoint_every=4)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    return TensorDataset(x, x @ torch.linspace(0.1, 0.5, 5) + 0.2)


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 1)


def _model_with_frozen_base():
    """A frozen first layer (the LM's role) under a trained head (the projector's)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Linear(5, 1))
    model[0].requires_grad_(False)
    return model


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).squeeze(-1), y)


def _collate(rows):
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def test_loss_goes_down(tmp_path):
    _, history = train(_model(), _data(), _collate, _loss, CFG, Accelerator(cpu=True), tmp_path, "fp")
    assert len(history) == 24  # 3 epochs x 8 steps
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]


LENGTHS = [(i * 37) % 23 for i in range(64)]  # any fixed lengths: the order they give must resume too


@pytest.fixture
def accelerator_at(request):
    """Accelerators at a precision: Accelerate keeps one per process, so the state is reset before and after."""
    AcceleratorState._reset_state(True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(True))
    return lambda precision: Accelerator(cpu=True, mixed_precision=precision)


@pytest.mark.parametrize("make_model, lengths, precision", [(_model, None, "no"), (_model_with_frozen_base, LENGTHS, "no"),
                                                            (_model_with_frozen_base, LENGTHS, "bf16")])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, make_model, lengths, precision, accelerator_at):
    reference = make_model()
    _, full = train(reference, _data(), _collate, _loss, CFG, accelerator_at(precision), tmp_path / "a", "fp", lengths=lengths)

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # after the checkpoint at step 8
            raise KeyboardInterrupt
        return _loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        train(make_model(), _data(), _collate, crashing_loss, CFG, accelerator_at(precision), tmp_path / "b", "fp", lengths=lengths)
    saved = load_file(tmp_path / "b" / "state" / "model.safetensors")
    assert set(saved) == {name for name, param in reference.named_parameters() if param.requires_grad}
    resumed_model = make_model()
    _, resumed = train(resumed_model, _data(), _collate, _loss, CFG, accelerator_at(precision), tmp_path / "b", "fp", lengths=lengths)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], rel=1e-6)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], tensor)


def _two_part_loss(model, batch):
    """Named losses, one drawing fresh noise from the global RNG each step (as Ross's timesteps and noise do)."""
    x, y = batch
    fit = torch.nn.functional.mse_loss(model[1](model[0](x)).squeeze(-1), y)
    noisy = (model[0](x + torch.randn_like(x)) ** 2).mean()
    return {"loss": fit + 0.1 * noisy, "fit": fit, "noisy": noisy}


def _two_part_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Linear(5, 1))


def test_named_losses_are_logged_and_resume_with_their_noise_and_param_groups(tmp_path):
    def run(folder, loss, logged=None):
        model = _two_part_model()
        groups = [{"params": model[0].parameters(), "lr": CFG.lr * 0.1}, {"params": model[1].parameters()}]
        log = (lambda metrics, step: logged.append(metrics)) if logged is not None else (lambda metrics, step: None)
        return train(model, _data(), _collate, loss, CFG, Accelerator(cpu=True), folder, "fp", log, param_groups=groups)

    logged = []
    reference, full = run(tmp_path / "a", _two_part_loss, logged)
    assert set(full[0]) == {"step", "loss", "lr", "fit", "noisy"} and set(logged[0]) == {"loss", "lr", "fit", "noisy"}
    assert full[0]["loss"] == pytest.approx(full[0]["fit"] + 0.1 * full[0]["noisy"], rel=1e-6)
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # after the checkpoint at step 8
            raise KeyboardInterrupt
        return _two_part_loss(model, batch)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crashing)
    resumed_model, resumed = run(tmp_path / "b", _two_part_loss)  # every run starts from seed 0: the noise of
    # steps 9-24 matches only if the RNG state comes back from the checkpoint
    assert [r["noisy"] for r in resumed] == pytest.approx([r["noisy"] for r in full], rel=1e-6)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], tensor)


def test_checkpoint_of_other_params_is_ignored(tmp_path):
    train(_model(), _data(), _collate, _loss, CFG, Accelerator(cpu=True), tmp_path, "old-params")
    _, history = train(_model(), _data(), _collate, _loss, CFG, Accelerator(cpu=True), tmp_path, "new-params")
    assert history[0]["step"] == 1 and len(history) == 24


def _padded(order: list[int], lengths: list[int], batch_size: int) -> int:
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


@pytest.mark.parametrize("n", [4 * GROUP_WINDOW * 8, 4 * GROUP_WINDOW * 8 + 5])
def test_batches_grouped_by_length_pad_less_and_stay_a_seeded_shuffle(n):
    lengths = torch.randint(10, 90, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    grouped = epoch_order(n, 0, 0, lengths, batch_size=8)
    assert sorted(grouped) == list(range(n))
    assert grouped == epoch_order(n, 0, 0, lengths, batch_size=8)
    assert grouped != epoch_order(n, 0, 1, lengths, batch_size=8)
    shuffled = epoch_order(n, 0, 0)
    assert _padded(grouped, lengths, 8) < 0.8 * _padded(shuffled, lengths, 8)
    if n % 8:  # the short batch the DataLoader cuts last holds the tail of the last window, not a random pick
        last_window = sorted(shuffled[(n // (GROUP_WINDOW * 8)) * GROUP_WINDOW * 8 :], key=lengths.__getitem__)
        assert grouped[-(n % 8) :] == last_window[-(n % 8) :]
    # batches are not simply ascending: the grouped batches were shuffled
    maxima = [max(lengths[i] for i in grouped[s : s + 8]) for s in range(0, n - n % 8, 8)]
    assert maxima != sorted(maxima)
