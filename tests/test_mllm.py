"""The MLLM core on a tiny random-init Llama that shares SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revision.checkpoints import load_mllm, save_mllm
from revision.conversations import IGNORE_INDEX, IMAGE_SLOT_ID
from revision.errors import InputError
from revision.lm import bundled_gguf_path, load_lm
from revision.mllm import MLLM, add_lora, freeze_lm
from tests.helpers import tiny_mllm

EMBED_DIM = 16
VISUAL_TOKENS = 3
CONVERSATIONS = [
    [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"},
        {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "And its shape?"},
        {"from": "gpt", "value": "A circle"},
    ],
    [
        {"from": "human", "value": "Describe <image> in one sentence."},
        {"from": "gpt", "value": "A small blue square on a white background, slightly off centre."},
    ],
]
ENCODER = {"kind": "lit", "name": "tiny", "dim": EMBED_DIM, "fingerprint": "abc123"}


@pytest.fixture
def model(tiny_lm_dir) -> MLLM:
    return tiny_mllm(tiny_lm_dir, EMBED_DIM, VISUAL_TOKENS, encoder=ENCODER)


def embeddings(n: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, EMBED_DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)


def answers(conversation) -> list[str]:
    return [turn["value"] for turn in conversation if turn["from"] == "gpt"]


def full_logits(model: MLLM, vectors: torch.Tensor, conversations) -> torch.Tensor:
    """The LM's logits at every position of the batch (not only where an answer token is predicted)."""
    return model._lm_forward(model.build_inputs(vectors, conversations)).logits


def rendered(model: MLLM, conversation) -> str:
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conversation]
    return model.tokenizer.apply_chat_template(messages, tokenize=False)


def test_bundled_gguf_is_found():
    path = bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_load_lm_refuses_hub_ids_unless_allowed(tmp_path):
    with pytest.raises(InputError, match="allow_hub"):
        load_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(InputError):
        load_lm(tmp_path / "missing")


def test_tiny_lm_keeps_the_chat_template(tiny_lm_dir, model):
    assert (tiny_lm_dir / "model.safetensors").is_file()
    assert "<|im_start|>" in model.tokenizer.chat_template
    assert model.tokenizer.eos_token == "<|im_end|>"


def test_labels_are_the_answers_and_their_end_of_turn_only(model):
    batch = model.build_inputs(embeddings(2), CONVERSATIONS)
    tokenizer = model.tokenizer
    for row, conversation in enumerate(CONVERSATIONS):
        labels = batch.labels[row]
        learned = labels[labels != IGNORE_INDEX].tolist()
        expected = "".join(answer + tokenizer.eos_token for answer in answers(conversation))
        assert tokenizer.decode(learned) == expected
        assert learned.count(tokenizer.eos_token_id) == len(answers(conversation))
        # Each labelled token is the input token at that position (the LM shifts internally).
        labelled = labels != IGNORE_INDEX
        assert torch.equal(batch.input_ids[row][labelled], labels[labelled])


def test_batch_is_right_padded_and_masked(model):
    batch = model.build_inputs(embeddings(2), CONVERSATIONS)
    lengths = batch.attention_mask.sum(dim=1)
    assert lengths[0] != lengths[1]
    for row, length in enumerate(lengths.tolist()):
        assert batch.attention_mask[row, :length].all() and not batch.attention_mask[row, length:].any()
        assert (batch.labels[row, length:] == IGNORE_INDEX).all()
        assert (batch.inputs_embeds[row, length:] == 0).all()


def test_visual_prefix_sits_exactly_at_the_placeholder(model):
    vectors = embeddings(2)
    batch = model.build_inputs(vectors, CONVERSATIONS)
    prefixes = model.projector(vectors)
    token_embeddings = model.lm.get_input_embeddings()
    for row, conversation in enumerate(CONVERSATIONS):
        before, after = rendered(model, conversation).split("<image>")
        before_ids = model.tokenizer(before, add_special_tokens=False)["input_ids"]
        start = batch.image_start[row]
        assert start == len(before_ids)
        assert batch.input_ids[row, :start].tolist() == before_ids
        assert (batch.input_ids[row, start : start + VISUAL_TOKENS] == IMAGE_SLOT_ID).all()
        assert IMAGE_SLOT_ID not in batch.input_ids[row, start + VISUAL_TOKENS :].tolist()
        torch.testing.assert_close(batch.inputs_embeds[row, start : start + VISUAL_TOKENS], prefixes[row])
        torch.testing.assert_close(batch.inputs_embeds[row, :start], token_embeddings(torch.tensor(before_ids)))
        length = int(batch.attention_mask[row].sum())
        rest = batch.input_ids[row, start + VISUAL_TOKENS : length].tolist()
        assert model.tokenizer.decode(rest) == after.rstrip()
        rest_embeds = batch.inputs_embeds[row, start + VISUAL_TOKENS : length]
        torch.testing.assert_close(rest_embeds, token_embeddings(torch.tensor(rest)))


@pytest.mark.parametrize("first_turn", ["no placeholder here", "<image> twice <image>"])
def test_exactly_one_placeholder_is_required(model, first_turn):
    conversation = [{"from": "human", "value": first_turn}, {"from": "gpt", "value": "ok"}]
    with pytest.raises(InputError, match="placeholder"):
        model.build_inputs(embeddings(1), [conversation])


def test_loss_and_answer_scores_equal_the_full_logits_cross_entropy(model):
    """The LM head runs only where an answer token is predicted; the numbers must not change."""
    emb = embeddings(2)
    batch = model.build_inputs(emb, CONVERSATIONS)
    logits = model.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # 0 where ignored
    nll, count, _ = model.answer_scores(emb, CONVERSATIONS)
    assert count.tolist() == (labels != IGNORE_INDEX).sum(dim=1).tolist()
    assert torch.allclose(nll, per_token.sum(dim=1), atol=1e-4)
    assert torch.allclose(model(emb, CONVERSATIONS).loss, per_token.sum() / count.sum(), atol=1e-5)
    answer = labels != IGNORE_INDEX
    missed = ((logits.argmax(-1) != labels) & answer).sum(dim=1)
    _, _, greedy = model.answer_scores(emb, CONVERSATIONS)
    assert greedy.tolist() == (missed == 0).tolist()


def test_answer_scores_call_an_answer_greedy_only_when_every_token_is_the_argmax(model, monkeypatch):
    targets, rows = torch.tensor([3, 1, 2, 0]), torch.tensor([0, 0, 1, 1])
    logits = torch.nn.functional.one_hot(targets, 5).float() * 4  # every answer token is the argmax ...
    logits[3] = torch.nn.functional.one_hot(torch.tensor(4), 5) * 4  # ... except the last token of row 1
    monkeypatch.setattr(model, "_answer_logits", lambda batch: (logits, targets, rows, None))
    monkeypatch.setattr(model, "build_inputs", lambda embeddings, conversations: None)
    sums, counts, greedy = model.answer_scores(embeddings(2), CONVERSATIONS)
    assert greedy.tolist() == [True, False] and counts.tolist() == [2, 2]
    assert sums[1] > sums[0]


def test_projector_steps_with_frozen_lm_lower_the_loss(model):
    freeze_lm(model)
    lm_before = {name: p.detach().clone() for name, p in model.lm.named_parameters()}
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=1e-2)
    vectors = embeddings(2)
    losses = []
    for _ in range(10):
        loss = model(vectors, CONVERSATIONS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(torch.equal(p, lm_before[name]) for name, p in model.lm.named_parameters())


def test_save_load_round_trip_gives_identical_outputs(model, tmp_path):
    vectors = embeddings(2)
    with torch.no_grad():
        model.projector.mlp[2].bias.add_(0.5)  # differ from any fresh init
        logits, loss = full_logits(model, vectors, CONVERSATIONS), model(vectors, CONVERSATIONS).loss
    save_mllm(model, tmp_path / "ckpt")
    for name in ["mllm.json", "projector.safetensors", "lm/model.safetensors", "lm/chat_template.jinja"]:
        assert (tmp_path / "ckpt" / name).is_file(), name
    assert not list((tmp_path / "ckpt").rglob("*.bin")) and not list((tmp_path / "ckpt").rglob("*.pt"))
    loaded = load_mllm(tmp_path / "ckpt")
    assert loaded.config == model.config and loaded.config.encoder == ENCODER
    with torch.no_grad():
        torch.testing.assert_close(full_logits(loaded, vectors, CONVERSATIONS), logits, rtol=0, atol=0)
        torch.testing.assert_close(loaded(vectors, CONVERSATIONS).loss, loss, rtol=0, atol=0)


def test_lora_is_merged_on_save(model, tmp_path):
    add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = {name for name, p in model.lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # LoRA B starts at zero; make the adapters matter
        vectors = embeddings(2)
        logits = full_logits(model, vectors, CONVERSATIONS)
    loaded = load_mllm(save_mllm(model, tmp_path / "ckpt"))
    assert not any("lora_" in name for name, _ in loaded.lm.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(full_logits(loaded, vectors, CONVERSATIONS), logits, rtol=1e-4, atol=1e-4)


def test_generate_returns_text_and_batches_like_single_calls(model):
    vectors = embeddings(3)
    questions = ["What is shown in this long question about the picture?", None, "Colour?"]
    batched = model.generate(vectors, questions, max_new_tokens=6)
    singles = [model.generate(vectors[i : i + 1], [questions[i]], max_new_tokens=6)[0] for i in range(3)]
    assert all(isinstance(text, str) and text for text in batched)
    assert batched == singles
    assert len(set(batched)) > 1
