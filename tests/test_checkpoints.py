"""Checkpoints hold what was trained: the projector always, the LM only where it changed (LoRA adapters, or a
fully trained LM); loading rebuilds the whole model from the recorded base LM and refuses a missing or
different one; export writes a folder that needs no base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from revision.checkpoints import export_mllm, load_mllm, save_mllm
from revision.errors import InputError
from revision.lm import lm_identity
from revision.mllm import MLLM, add_lora, freeze_lm
from tests.helpers import tiny_mllm

EMBED_DIM = 8
ENCODER = {"kind": "lit", "name": "tiny", "dim": EMBED_DIM, "id": "enc"}
CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}],
    [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A small blue square."}],
]


@pytest.fixture
def base(tiny_lm_dir, tmp_path) -> Path:
    """A private copy of the tiny LM folder (tests change it), found by its absolute path."""
    return Path(shutil.copytree(tiny_lm_dir, tmp_path / "base_lm"))


def built_on(base: Path) -> MLLM:
    model = tiny_mllm(base, EMBED_DIM, visual_tokens=2, encoder=ENCODER)
    model.config.base_lm = lm_identity(base)
    with torch.no_grad():
        model.projector.mlp[2].bias.add_(0.3)  # differ from any fresh init
    return model


def logits(model: MLLM) -> torch.Tensor:
    vectors = F.normalize(torch.randn(2, EMBED_DIM, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        return model.eval()._lm_forward(model.build_inputs(vectors, CONVERSATIONS)).logits


def files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def test_frozen_lm_checkpoint_is_the_projector_and_a_reference(base, tmp_path):
    model = freeze_lm(built_on(base))
    expected = logits(model)
    save_mllm(model, tmp_path / "ckpt")
    assert files(tmp_path / "ckpt") == {"mllm.json", "projector.safetensors"}
    torch.testing.assert_close(logits(load_mllm(tmp_path / "ckpt")), expected, rtol=0, atol=0)


def test_lora_checkpoint_is_the_adapter_and_loads_merged(base, tmp_path):
    model = add_lora(built_on(base), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # LoRA B starts at zero; make the adapters matter
    expected = logits(model)
    save_mllm(model, tmp_path / "ckpt")
    saved = files(tmp_path / "ckpt")
    assert not any(name.startswith("lm/") for name in saved)
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= saved
    adapter_bytes = (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.2 * sum((base / name).stat().st_size for name in files(base) if name.endswith(".safetensors"))
    loaded = load_mllm(tmp_path / "ckpt")
    assert not any("lora_" in name for name, _ in loaded.lm.named_parameters())
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-4, atol=1e-4)


def test_full_finetune_checkpoint_carries_the_lm(base, tmp_path):
    model = built_on(base)
    with torch.no_grad():
        model.lm.get_input_embeddings().weight.mul_(1.5)  # what a trained LM would carry
    expected = logits(model)
    save_mllm(model, tmp_path / "ckpt")
    assert "lm/model.safetensors" in files(tmp_path / "ckpt")
    shutil.rmtree(base)  # a fully trained LM does not need its base
    torch.testing.assert_close(logits(load_mllm(tmp_path / "ckpt")), expected, rtol=0, atol=0)


def test_a_missing_base_lm_is_a_clear_error(base, tmp_path):
    save_mllm(freeze_lm(built_on(base)), tmp_path / "ckpt")
    shutil.rmtree(base)
    with pytest.raises(InputError, match=r"ckpt: its base LM .*base_lm is missing"):
        load_mllm(tmp_path / "ckpt")


def test_a_different_base_lm_is_refused(base, tmp_path):
    save_mllm(freeze_lm(built_on(base)), tmp_path / "ckpt")
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights changed
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="is not the one it was trained on"):
        load_mllm(tmp_path / "ckpt")


def test_a_relative_base_is_found_beside_the_checkpoint(tiny_lm_dir, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_lm_dir, repo / "data" / "lm")
    monkeypatch.chdir(repo)
    model = freeze_lm(tiny_mllm(Path("data/lm"), EMBED_DIM, visual_tokens=2, encoder=ENCODER))
    model.config.base_lm = lm_identity(Path("data/lm"))  # as the stages record it
    expected = logits(model)
    save_mllm(model, Path("data/pretrain"))
    monkeypatch.chdir(tmp_path)  # read from outside the repository
    torch.testing.assert_close(logits(load_mllm(repo / "data" / "pretrain")), expected, rtol=0, atol=0)


def test_the_base_beside_the_checkpoint_wins_over_one_in_the_working_directory(tiny_lm_dir, tmp_path, monkeypatch):
    repo, other = tmp_path / "repo", tmp_path / "other"
    shutil.copytree(tiny_lm_dir, repo / "data" / "lm")
    weights = Path(shutil.copytree(tiny_lm_dir, other / "data" / "lm")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 0xFF]))  # another LM
    monkeypatch.chdir(repo)
    model = freeze_lm(tiny_mllm(Path("data/lm"), EMBED_DIM, visual_tokens=2, encoder=ENCODER))
    model.config.base_lm = lm_identity(Path("data/lm"))
    expected = logits(model)
    save_mllm(model, Path("data/pretrain"))
    monkeypatch.chdir(other)  # e.g. the tests' own checkouts read from a project folder that has run `make repro`
    torch.testing.assert_close(logits(load_mllm(repo / "data" / "pretrain")), expected, rtol=0, atol=0)


def test_export_is_self_contained(base, tmp_path):
    model = add_lora(built_on(base), r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    expected = logits(model)
    save_mllm(model, tmp_path / "ckpt")
    export_mllm(tmp_path / "ckpt", tmp_path / "exported")
    assert {"lm/model.safetensors", "lm/chat_template.jinja", "projector.safetensors"} <= files(tmp_path / "exported")
    shutil.rmtree(base)
    torch.testing.assert_close(logits(load_mllm(tmp_path / "exported")), expected, rtol=1e-4, atol=1e-4)


def test_saved_bytes_do_not_depend_on_where_the_base_was_read(tiny_lm_dir, tmp_path):
    saved = []
    for checkout in ("one", "two"):  # the same LM in two checkouts, loaded by absolute path as a resumed run does
        lm_dir = Path(shutil.copytree(tiny_lm_dir, tmp_path / checkout / "data" / "lm"))
        model = tiny_mllm(lm_dir, EMBED_DIM, visual_tokens=2, encoder=ENCODER)
        model.config.base_lm = {**lm_identity(lm_dir), "path": "data/lm"}
        torch.manual_seed(1)
        add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
        out = save_mllm(model, tmp_path / checkout / "ckpt")
        saved.append({name: (out / name).read_bytes() for name in files(out)})
    assert saved[0] == saved[1]
