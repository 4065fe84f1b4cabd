"""VoRA: the mask, the vision LoRA, the block-wise distillation and cached decoding are VoRA's, not look-alikes."""

from __future__ import annotations

import functools

import pytest
import torch

from revision.attention import additive_mask, attention_allowed, positions
from revision.checkpoints import load_mllm
from revision.config import ModelConfig, VoraConfig
from revision.errors import InputError
from revision.mllm import new_mllm
from revision.objectives import Batch
from revision.visual_input import PixelRows, PixelsInput, pixel_identity
from revision.vora import PROJECTIONS, Vora, add_vision_lora

SIZE, PATCH = 16, 8  # 4 image tokens


def vora_cfg(**changes) -> VoraConfig:
    values = dict(image_size=SIZE, patch=PATCH, lora_r=4, lora_alpha=4, blocks=1, teacher="tiny", teacher_size=32,
                  distill_weight=1.0, distill_offset=0, attention="bidirectional", finetune_lm=True, text_share=0.0)
    return VoraConfig(**{**values, **changes})


def pixels_model(lm_dir, cfg: VoraConfig, lora: bool = True, seed: int = 0):
    model_cfg = ModelConfig(lm=str(lm_dir), visual_input="pixels", visual_tokens=4, grid=4, trust_remote_code=False,
                            system_prompt=None, seed=seed)
    torch.manual_seed(seed)
    visual = PixelsInput(cfg.image_size, cfg.patch)
    model = new_mllm(lm_dir, model_cfg, visual, pixel_identity(cfg.image_size), 64, cfg.attention)
    model.lm.requires_grad_(False)
    return add_vision_lora(model, cfg) if lora else model


def vora_model(lm_dir, cfg: VoraConfig) -> Vora:
    """VoRA's stage-1 objective around a fresh pixels model with its vision LoRA (rebuilt the same way)."""
    build = functools.partial(pixels_model, lm_dir, cfg)
    return Vora(build(), build, cfg)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3 * SIZE * SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def captions(n: int) -> list:
    texts = ["a red circle", "a small blue square on white", "green triangle", "a yellow shape"]
    return [[{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": texts[i % 4]}] for i in range(n)]


def test_the_mask_is_the_loop_built_one_and_plain_causal_when_asked():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1]])
    starts, n = [2, 4], 3
    expected = torch.zeros(2, 9, 9, dtype=torch.bool)
    for b in range(2):
        for q in range(9):
            for k in range(9):
                both_image = starts[b] <= q < starts[b] + n and starts[b] <= k < starts[b] + n
                expected[b, q, k] = bool(mask[b, k]) and (k <= q or both_image)
    assert torch.equal(attention_allowed(mask, starts, n), expected)
    causal = torch.ones(9, 9, dtype=torch.bool).tril() & mask.bool()[:, None, :]
    assert torch.equal(attention_allowed(mask, starts, n, bidirectional=False), causal)
    assert not torch.equal(expected, causal)  # the image block is what differs
    additive = additive_mask(expected, torch.float32)
    assert additive.shape == (2, 1, 9, 9) and torch.equal(additive[:, 0] == 0, expected)


def _states(model, pixels, conversations):
    batch = model.build_inputs(pixels, conversations)
    return batch, model._lm_forward(batch, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_image_tokens_see_each_other_and_text_after_them_changes_nothing_before(tiny_lm_dir, attention):
    model = pixels_model(tiny_lm_dir, vora_cfg(attention=attention), lora=False)
    pixels = images(1)
    batch, states = _states(model, pixels, captions(1))
    first = batch.image_start[0]
    changed = pixels.view(1, 3, SIZE, SIZE).clone()
    changed[..., PATCH:, PATCH:] *= -1  # the last patch: the last image token
    _, after = _states(model, changed.flatten(1), captions(1))
    moved = not torch.allclose(states[0, first], after[0, first])
    assert moved == (attention == "bidirectional")
    assert torch.allclose(states[0, :first], after[0, :first])  # text before the image never sees it
    other_text = [[captions(1)[0][0], {"from": "gpt", "value": "something else entirely"}]]
    _, other = _states(model, pixels, other_text)
    end = first + 4
    assert torch.equal(states[0, :end], other[0, :end])  # the answer after the image changes nothing before it


def test_lora_sits_in_the_first_blocks_on_the_seven_projections_and_starts_as_the_base_lm(tiny_lm_dir):
    base = pixels_model(tiny_lm_dir, vora_cfg(), lora=False)
    model = pixels_model(tiny_lm_dir, vora_cfg(), lora=True)
    lora = [name for name, _ in model.lm.named_parameters() if "lora_" in name]
    assert len(lora) == 2 * len(PROJECTIONS)  # A and B, first block only
    assert all(".layers.0." in name for name in lora)
    assert {name.split(".lora_")[0].rsplit(".", 1)[1] for name in lora} == set(PROJECTIONS)
    trainable = {name for name, p in model.lm.named_parameters() if p.requires_grad}
    assert trainable == set(lora) and not any("bias" in name for name in trainable)
    ids = model.tokenizer("plain text, no image", return_tensors="pt")["input_ids"]
    assert torch.equal(model.lm(input_ids=ids).logits, base.lm(input_ids=ids).logits)


def _train(model: Vora, steps: int, pixels, conversations) -> list[dict]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for _ in range(steps):
        losses = model(Batch(pixels, conversations))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


def test_distillation_learns_and_its_gradient_reaches_lora_and_patches_never_the_teacher(tiny_lm_dir):
    model = vora_model(tiny_lm_dir, vora_cfg())
    pixels, conversations = images(8), captions(8)
    assert len(model.heads) == len(model.teacher.widths) == 2
    history = _train(model, 40, pixels, conversations)
    assert history[-1]["distill_loss"] < 0.7 * history[0]["distill_loss"]
    assert set(history[0]) == {"loss", "lm_loss", "distill_loss", "distill_block1", "distill_block2"}
    model.zero_grad()
    model(Batch(pixels, conversations))["distill_loss"].backward()
    assert model.mllm.projector.conv.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.mllm.lm.named_parameters() if "lora_A" in n)
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())


def _text_only(n: int) -> list:
    texts = ["a grey disc on the left", "a pair of trousers"]
    return [[{"from": "human", "value": "Write a short caption for a picture."}, {"from": "gpt", "value": texts[i % 2]}]
            for i in range(n)]


def test_text_only_samples_have_the_lm_loss_only_and_never_read_their_pixels(tiny_lm_dir):
    model = vora_model(tiny_lm_dir, vora_cfg())
    pixels, conversations, has_image = images(4), captions(2) + _text_only(2), torch.tensor([True, True, False, False])
    mixed = model(Batch(pixels, conversations, has_image=has_image))
    images_only = model(Batch(pixels[:2], conversations[:2]))
    for name in ["distill_loss", "distill_block1", "distill_block2"]:  # distillation: the image samples alone
        assert torch.allclose(mixed[name], images_only[name], atol=1e-6), name
    text_lm = model.mllm(pixels[2:], conversations[2:], has_image[2:]).loss
    other = model.mllm(images(2, seed=9), conversations[2:], has_image[2:]).loss
    assert torch.equal(text_lm, other)  # a text-only sample's pixels are never read
    assert not torch.allclose(mixed["lm_loss"], images_only["lm_loss"])  # but its answer is in the LM loss
    text_batch = model(Batch(pixels[2:], conversations[2:], has_image=has_image[2:]))
    assert text_batch["distill_loss"].item() == 0
    model.zero_grad()
    text_batch["loss"].backward()
    assert model.mllm.projector.conv.weight.grad is None or not model.mllm.projector.conv.weight.grad.any()
    lora_b = [p.grad for n, p in model.mllm.lm.named_parameters() if "lora_B" in n]  # B starts at zero, A does not
    assert any(grad is not None and grad.any() for grad in lora_b)  # text trains the vision LoRA too (as the authors')
    with pytest.raises(InputError, match="without an image needs no"):
        model(Batch(pixels[:1], captions(1), has_image=torch.tensor([False])))
    with pytest.raises(InputError, match="with an image needs exactly one"):
        model(Batch(pixels[:1], _text_only(1), has_image=torch.tensor([True])))


def test_the_text_share_adds_corpus_texts_flagged_text_only(tmp_path):
    import numpy as np
    import pandas as pd

    from revision.layout import TEXT_CORPUS
    from revision.training_data import EmbeddingConversations, with_text_only

    corpus = pd.DataFrame({"id": [f"t{i}" for i in range(5)], "text": [f"corpus text {i}" for i in range(5)]})
    corpus.to_parquet(tmp_path / TEXT_CORPUS.file)
    paired = EmbeddingConversations(np.ones((6, 12), np.float32), captions(6))
    mixed = with_text_only(paired, tmp_path, 0.25, seed=0)
    assert len(mixed) == 8 and mixed.has_image.tolist() == [True] * 6 + [False] * 2
    assert mixed.conversations[:6] == paired.conversations
    assert {c[1]["value"] for c in mixed.conversations[6:]} <= set(corpus["text"])
    assert not any("<image>" in c[0]["value"] for c in mixed.conversations[6:])
    assert not mixed.vectors[6:].any() and mixed.digest() != with_text_only(paired, tmp_path, 0.25, seed=1).digest()
    with pytest.raises(InputError, match=rf"{TEXT_CORPUS.file}: a text share of 0.5 next to 6 image samples needs 6"):
        with_text_only(paired, tmp_path, 0.5, seed=0)


def test_merged_checkpoint_gives_the_logits_of_the_unmerged_model(tiny_lm_dir, tmp_path):
    model = vora_model(tiny_lm_dir, vora_cfg())
    pixels, conversations = images(4), captions(4)
    _train(model, 5, pixels, conversations)  # LoRA B leaves zero
    model.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "lm").exists() and (tmp_path / "ckpt" / "adapter").is_dir()
    loaded = load_mllm(tmp_path / "ckpt")
    assert not hasattr(loaded.lm, "peft_config")  # merged
    with torch.no_grad():
        assert torch.allclose(_logits(model.mllm, pixels, conversations), _logits(loaded, pixels, conversations), atol=1e-5)
    assert loaded.config.image_attention == "bidirectional" and loaded.config.visual == PixelsInput(SIZE, PATCH)


def _logits(model, pixels, conversations) -> torch.Tensor:
    """The LM's logits at every position of the batch (with the model's image attention)."""
    return model._lm_forward(model.build_inputs(pixels, conversations)).logits


def test_rebuild_makes_a_fresh_vora_of_the_same_shape_that_takes_the_trained_state(tiny_lm_dir):
    model = vora_model(tiny_lm_dir, vora_cfg())
    _train(model, 2, images(2), captions(2))
    rebuilt = model.rebuild()  # what train_and_save loads the gathered state into
    assert isinstance(rebuilt, Vora) and rebuilt.mllm is not model.mllm and rebuilt.cfg == model.cfg
    trained = model.state_dict()
    assert not all(torch.equal(rebuilt.state_dict()[name], value) for name, value in trained.items())
    rebuilt.load_state_dict(trained)
    for name, value in trained.items():
        assert torch.equal(rebuilt.state_dict()[name], value), name


def test_cached_greedy_decoding_equals_recomputing_with_the_mask_at_every_step(tiny_lm_dir):
    model = pixels_model(tiny_lm_dir, vora_cfg(), lora=False)
    pixels, questions, steps = images(2), ["What colour is it?", "Describe the shape in the picture in detail."], 6
    answers = model.generate(pixels, questions, max_new_tokens=steps)
    prompts = [model._pieces(model.conversation(q), generation_prompt=True) for q in questions]
    batch = model._collate(prompts, model._project(pixels), pad_left=True)
    embeds, mask, start = batch.inputs_embeds, batch.attention_mask, batch.image_start
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            allowed = attention_allowed(mask, start, 4)
            out = model.lm(inputs_embeds=embeds, attention_mask=additive_mask(allowed, embeds.dtype), position_ids=positions(mask))
            token = out.logits[:, -1].argmax(-1)
            tokens.append(token)
            embeds = torch.cat([embeds, model.lm.get_input_embeddings()(token)[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    reference = model.tokenizer.batch_decode(torch.stack(tokens, 1), skip_special_tokens=True)
    assert answers == [text.strip() for text in reference]
    assert PixelRows(SIZE).dim == pixels.shape[1]


# ------------------------------------------------------------------ through the real CLI, on the tiny pipeline


def _invoke(repo, *args: str):
    import contextlib

    from typer.testing import CliRunner

    from stages.cli import app

    with contextlib.chdir(repo):
        return CliRunner().invoke(app, list(args))


def _pixels_params(repo, tmp_path, **vora) -> str:
    from tests.helpers import edit_params

    path = edit_params(repo / "params.yaml", "model", tmp_path / "params.yaml", visual_input="pixels")
    path = edit_params(path, "pretrain", source="paired")
    return str(edit_params(path, "vora", **vora) if vora else path)


@pytest.mark.slow
def test_a_text_stage_1_cannot_train_a_pixels_model(tiny_repo, tmp_path):
    from tests.helpers import edit_params

    params = edit_params(_pixels_params(tiny_repo, tmp_path), "pretrain", source="aligned")
    result = _invoke(tiny_repo, "pretrain", "--params", str(params), "--out", str(tmp_path / "out"), "--checkpoints", str(tmp_path / "c"))
    assert result.exit_code == 2 and "model.visual_input: pixels needs images in stage 1" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_vora_trains_both_stages_and_evaluates_and_chats_from_pixels(tiny_repo, tmp_path):
    import contextlib
    import json

    import pandas as pd

    from revision.embedding_sets import EmbeddingSet

    params = _pixels_params(tiny_repo, tmp_path, finetune_lm=False, text_share=0.25)
    pixels = str(tmp_path / "pixels")
    made = _invoke(tiny_repo, "visual", "--params", params, "--out", pixels, "--metrics", str(tmp_path / "g.json"))
    assert made.exit_code == 0, made.output[-2000:]
    rows = EmbeddingSet(tmp_path / "pixels" / "eval_images")
    assert rows.encoder == pixel_identity(SIZE) and rows.dim == 3 * SIZE * SIZE
    prepared = tiny_repo / "data" / "prepared"
    image = prepared / pd.read_parquet(prepared / "eval.parquet")["image"].iloc[0]
    from revision.images import read_image

    assert torch.allclose(torch.from_numpy(rows.load()[0]), PixelRows(SIZE).encode_images([read_image(image, str(image))])[0])
    common = ["--params", params, "--visual", pixels]
    stage1 = _invoke(tiny_repo, "pretrain", *common, "--out", str(tmp_path / "pre"), "--checkpoints", str(tmp_path / "c1"),
                     "--metrics", str(tmp_path / "p.json"), "--loss-plot", str(tmp_path / "p.csv"))
    assert stage1.exit_code == 0, stage1.output[-2000:]
    from revision.config import load_stage_config

    pairs = len(pd.read_parquet(prepared / "pretrain_pairs.parquet"))
    pairs = min(pairs, load_stage_config("pretrain", params).max_samples or pairs)
    assert json.loads((tmp_path / "p.json").read_text())["samples"] == pairs + round(pairs * 0.25 / 0.75)  # + texts
    curve = pd.read_csv(tmp_path / "p.csv")
    assert {"lm_loss", "distill_loss", "distill_block1", "distill_block2"} <= set(curve.columns)
    assert curve["distill_loss"].iloc[-3:].mean() < curve["distill_loss"].iloc[:3].mean()
    assert (tmp_path / "pre" / "adapter").is_dir() and not (tmp_path / "pre" / "vora").exists()  # heads dropped
    stage2 = _invoke(tiny_repo, "finetune", *common, "--pretrained", str(tmp_path / "pre"), "--out", str(tmp_path / "fin"),
                     "--checkpoints", str(tmp_path / "c2"), "--metrics", str(tmp_path / "f.json"),
                     "--loss-plot", str(tmp_path / "f.csv"))
    assert stage2.exit_code == 0, stage2.output[-2000:]
    with contextlib.chdir(tiny_repo):  # the checkpoints record the base LM as the stage saw it: data/lm
        merged, finetuned = load_mllm(tmp_path / "pre"), load_mllm(tmp_path / "fin")
    for (name, before), after in zip(merged.lm.state_dict().items(), finetuned.lm.state_dict().values()):
        assert torch.equal(before, after), name  # finetune_lm: false trains the patch embedding only
    assert not torch.equal(merged.projector.conv.weight, finetuned.projector.conv.weight)
    answer = _invoke(tiny_repo, "chat", "--image", str(image), "--checkpoint", str(tmp_path / "fin"), "--max-new-tokens", "6")
    assert answer.exit_code == 0, answer.output[-2000:]
    assert answer.stdout.strip() == finetuned.generate(torch.from_numpy(rows.load()[:1]), [None], max_new_tokens=6)[0].strip()
    metrics = tmp_path / "e" / "metrics.json"
    done = _invoke(tiny_repo, "evaluate", "--params", params, "--predictions", str(tmp_path / "e"), "--metrics", str(metrics),
                   "--visual", pixels, "--checkpoints", str(tmp_path / "pre"), "--checkpoints", str(tmp_path / "fin"),
                   "--checkpoints", "data/finetune")
    assert done.exit_code == 0, done.output[-2000:]
    scores = json.loads(metrics.read_text())
    assert set(scores) == {"pre", "fin", "finetune"} and "cider" in scores["fin"]
