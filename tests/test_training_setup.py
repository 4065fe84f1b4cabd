"""The training stages' assembly: combinations of params that cannot work are refused in one place, naming them."""

from __future__ import annotations

from pathlib import Path

import pytest

from revision.config import FinetuneConfig, PretrainConfig
from revision.errors import InputError
from revision.training_setup import refuse_impossible
from tests.helpers import committed_params

PARAMS = committed_params()


def pretrain(**changes) -> PretrainConfig:
    return PretrainConfig.model_validate({**PARAMS["pretrain"], **changes})


def finetune(**changes) -> FinetuneConfig:
    return FinetuneConfig.model_validate({**PARAMS["finetune"], **changes})


@pytest.mark.parametrize(
    "visual_input, stage, message",
    [
        ("pooled", {"pretrain": pretrain(source="aligned", ross=True)}, "pretrain.ross needs pretrain.source: paired"),
        ("grid", {"pretrain": pretrain(source="aligned")}, "model.visual_input: grid needs images in stage 1"),
        ("pixels", {"pretrain": pretrain(source="raw")}, "model.visual_input: pixels needs images in stage 1"),
        ("pixels", {"pretrain": pretrain(source="paired", ross=True)}, "pretrain.ross is not available with model.visual_input: pixels"),
        ("pixels", {"finetune": finetune(ross=True)}, "finetune.ross is not available with model.visual_input: pixels"),
    ],
)
def test_impossible_combinations_are_refused_naming_their_params(visual_input, stage, message):
    with pytest.raises(InputError, match=message) as refused:
        refuse_impossible(Path("my_params.yaml"), visual_input, **stage)
    assert str(refused.value).startswith("my_params.yaml: ")


@pytest.mark.parametrize(
    "visual_input, stage",
    [
        ("pooled", {"pretrain": pretrain(source="aligned")}),
        ("pooled", {"pretrain": pretrain(source="paired", ross=True)}),
        ("grid", {"pretrain": pretrain(source="paired", ross=True)}),
        ("grid", {"pretrain": pretrain(source="none")}),
        ("pixels", {"pretrain": pretrain(source="paired")}),
        ("grid", {"finetune": finetune(ross=True)}),
    ],
)
def test_the_combinations_the_study_runs_are_allowed(visual_input, stage):
    refuse_impossible(Path("params.yaml"), visual_input, **stage)
