"""Conversations as the MLLM reads them: rendered with the tokenizer's chat template, cut into runs, and
batched with the visual prefix spliced in.

A LLaVA-style conversation (``[{"from": "human"|"gpt", "value": ...}]``, the first human turn holding the
image placeholder) is rendered turn by turn and tokenized piece by piece; the projected visual vectors replace
the placeholder in ``inputs_embeds``. Labels are -100 everywhere except the assistant answers and the
end-of-turn marker that closes each one, so the loss teaches answering, not asking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from revision.errors import InputError

IGNORE_INDEX = -100
IMAGE_SLOT_ID = -200  # marks visual positions in MLLMBatch.input_ids (never fed to the LM)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Conversation = Sequence[dict[str, str]]


@dataclass
class MLLMBatch:
    """LM inputs for a batch: right-padded (left-padded to generate), visual prefix spliced in at each sample's
    placeholder."""

    inputs_embeds: torch.Tensor  # (B, T, hidden)
    attention_mask: torch.Tensor  # (B, T), 0 on padding
    labels: torch.Tensor  # (B, T), IGNORE_INDEX except assistant answers
    input_ids: torch.Tensor  # (B, T), IMAGE_SLOT_ID at visual positions, pad id on padding
    image_start: list[int]  # index of each sample's first visual position (-1: a text-only sample)


@dataclass
class Piece:
    """A run of the rendered conversation: token ids (with a label flag) or the visual prefix slot."""

    token_ids: list[int]
    is_answer: bool = False
    is_image: bool = False


def ask(question: str, image_token: str, answer: str | None = None) -> Conversation:
    """The turns a model is asked in: the image and ``question``, then ``answer`` when given."""
    text = question if image_token in question else f"{image_token}\n{question}"
    turns = [{"from": "human", "value": text}]
    return turns + [{"from": "gpt", "value": answer}] if answer is not None else turns


def as_messages(conversation: Conversation, system_prompt: str | None) -> list[dict[str, str]]:
    """LLaVA turns -> chat-template messages (with ``system_prompt``, if any)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    for turn in conversation:
        role = ROLES.get(turn.get("from", turn.get("role", "")))
        if role is None:
            raise InputError(f"unknown conversation role in turn {turn}; expected one of {sorted(ROLES)}")
        messages.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
    return messages


def pieces(
    tokenizer: Any, messages: list[dict[str, str]], image_token: str, generation_prompt: bool = False, image: bool = True
) -> list[Piece]:
    """The conversation's runs; it must hold one placeholder (none when it is text only: ``image`` false)."""
    runs: list[Piece] = []
    for text, is_answer in segments(tokenizer, messages, generation_prompt):
        if is_answer:
            runs.append(Piece(_encode(tokenizer, text), is_answer=True))
            continue
        before, *after = text.split(image_token)
        runs.append(Piece(_encode(tokenizer, before)))
        for rest in after:
            runs += [Piece([], is_image=True), Piece(_encode(tokenizer, rest))]
    if sum(piece.is_image for piece in runs) != image:
        wanted = "exactly one" if image else "no"
        raise InputError(f"a conversation {'with' if image else 'without'} an image needs {wanted} "
                         f"{image_token!r} placeholder: {messages}")
    return runs


def segments(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) runs.

    Each answer run is an assistant turn's content plus the end-of-turn marker the template puts after it
    (trailing whitespace such as the newline after `<|im_end|>` stays unlabelled). Works for any template that
    renders a conversation as the concatenation of its turns.
    """
    runs: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise InputError("the tokenizer's chat template does not render conversations turn by turn")
        answer_end = len(full.rstrip())
        runs += [(prompt[len(done) :], False), (full[len(prompt) : answer_end], True)]
        done = full[:answer_end]
    if generation_prompt:
        runs.append((_render(tokenizer, messages, add_generation_prompt=True)[len(done) :], False))
    elif not runs:
        raise InputError(f"conversation has no assistant turn to learn from: {messages}")
    return runs


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def collate(
    samples: list[list[Piece]], prefixes: torch.Tensor, embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    pad_id: int, max_length: int | None, pad_left: bool,
) -> MLLMBatch:
    """One batch of rendered samples, each with its visual prefix; ``embed_tokens`` is the LM's input embedding."""
    device = prefixes.device
    rows = [_sample_row(runs, prefix, embed_tokens, max_length) for runs, prefix in zip(samples, prefixes)]
    width = max(embeds.shape[0] for embeds, *_ in rows)
    batch_size, hidden = len(rows), prefixes.shape[-1]
    inputs_embeds = prefixes.new_zeros(batch_size, width, hidden)
    attention_mask = torch.zeros(batch_size, width, dtype=torch.long, device=device)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long, device=device)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long, device=device)
    image_start = []
    for i, (embeds, ids, row_labels, start) in enumerate(rows):
        offset = width - embeds.shape[0] if pad_left else 0
        span = slice(offset, offset + embeds.shape[0])
        inputs_embeds[i, span], attention_mask[i, span] = embeds, 1
        labels[i, span], input_ids[i, span] = row_labels, ids
        image_start.append(offset + start if start >= 0 else -1)
    return MLLMBatch(inputs_embeds, attention_mask, labels, input_ids, image_start)


def _sample_row(
    runs: list[Piece], prefix: torch.Tensor, embed_tokens: Callable[[torch.Tensor], torch.Tensor], max_length: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(embeddings, ids with IMAGE_SLOT_ID at visual positions, labels, image start: -1 without one) of one
    sample, cut to ``max_length`` positions from the right."""
    ids, labels, parts, image_start = [], [], [], -1
    device = prefix.device
    for piece in runs:
        if piece.is_image:
            image_start = len(ids)
            ids += [IMAGE_SLOT_ID] * prefix.shape[0]
            labels += [IGNORE_INDEX] * prefix.shape[0]
            parts.append(prefix)
        elif piece.token_ids:
            ids += piece.token_ids
            labels += piece.token_ids if piece.is_answer else [IGNORE_INDEX] * len(piece.token_ids)
            parts.append(embed_tokens(torch.tensor(piece.token_ids, device=device)))
    limit = max_length or len(ids)
    return torch.cat(parts)[:limit], torch.tensor(ids[:limit], device=device), torch.tensor(labels[:limit], device=device), image_start
