"""params.yaml is the one place values are set: configs carry no defaults, profiles merge without losing comments."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from revision.config import STAGE_CONFIGS, StudyConfig, apply_profile, load_stage_config, normalized_block, read_params
from revision.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _fields(model: type[BaseModel], prefix: str):
    for name, field in model.model_fields.items():
        yield f"{prefix}.{name}", field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{prefix}.{name}")


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
def test_configs_hold_no_default_values(stage):
    with_default = [name for name, field in _fields(STAGE_CONFIGS[stage], stage) if not field.is_required()]
    assert not with_default, f"defaults belong in params.yaml, not config.py: {with_default}"


def test_the_study_settings_hold_no_default_values_and_its_profile_sets_them():
    """`revision study` is no DVC stage: its settings are the study block of profiles/study.yaml."""
    assert all(field.is_required() for field in StudyConfig.model_fields.values())
    load_stage_config("study", ROOT / "profiles" / "study.yaml", StudyConfig)
    assert "study" not in read_params(ROOT / "params.yaml")  # every pipeline run records all of params.yaml


@pytest.mark.parametrize("profile", [None, *sorted(p.name for p in (ROOT / "profiles").glob("*.yaml"))])
def test_params_and_every_profile_give_valid_configs(tmp_path, profile):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    if profile:
        apply_profile(ROOT / "profiles" / profile, params)
    for stage in STAGE_CONFIGS:
        load_stage_config(stage, params)


def test_a_missing_key_is_an_error_naming_it(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["finetune"]["lr"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(InputError, match=r"finetune\.lr: Field required"):
        load_stage_config("finetune", tmp_path / "params.yaml")


def test_profile_merges_values_and_keeps_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    original = params.read_text()
    merged = apply_profile(ROOT / "profiles" / "tiny.yaml", params)
    profile = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    assert merged["model"]["lm"] == profile["model"]["lm"] == "tiny"
    assert merged["prepare"]["sources"] == profile["prepare"]["sources"]  # replaced whole, not merged
    assert merged["finetune"]["lora_targets"] == yaml.safe_load(original)["finetune"]["lora_targets"]  # untouched
    comments = [line.strip() for line in original.splitlines() if line.strip().startswith("#")]
    assert comments and all(comment in params.read_text() for comment in comments)
    assert yaml.safe_load(params.read_text()) == merged


def test_a_profile_writes_no_as_a_string_every_yaml_reader_agrees_on(tmp_path):
    """params.yaml says `mixed_precision: auto`; the tiny profile's "no" replaces it. Written bare, PyYAML (YAML 1.1)
    would read false where DVC (YAML 1.2) reads "no", and a params file rewritten by one would look changed to
    the other."""
    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  mixed_precision: auto  # the default\n  seed: 0\n")
    (tmp_path / "profile.yaml").write_text('pretrain:\n  mixed_precision: "no"\n  seed: 1\n')
    apply_profile(tmp_path / "profile.yaml", params)
    assert yaml.safe_load(params.read_text())["pretrain"] == {"mixed_precision": "no", "seed": 1}
    assert "# the default" in params.read_text()


def test_a_block_dvc_rewrote_records_the_same_values():
    """`dvc exp run -S` writes `mixed_precision: no` bare, which YAML 1.1 reads as false; records (MLflow
    params) must not show that as a difference."""
    for stage in ("finetune", "evaluate"):
        block = {**read_params(ROOT / "params.yaml")[stage], "mixed_precision": "no"}
        rewritten = {**block, "mixed_precision": False}
        assert normalized_block(stage, rewritten) == normalized_block(stage, block)
        assert normalized_block(stage, rewritten)["mixed_precision"] == "no"
    assert normalized_block("launch", "revision") == "revision"  # not a stage block: as it is


def test_the_study_profile_merges_its_sizes_but_never_its_study_block(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    merged = apply_profile(ROOT / "profiles" / "study.yaml", params)
    assert "study" in read_params(ROOT / "profiles" / "study.yaml") and "study" not in merged
    sizes = read_params(ROOT / "profiles" / "study.yaml")["pretrain"]
    assert all(merged["pretrain"][key] == value for key, value in sizes.items())
