"""Attention masks with bidirectional image tokens (VoRA), and greedy decoding under such a mask.

The image tokens of an image attend to each other both ways; every other position stays causal, and padding is
never attended to. The mask is the 4-D additive form Hugging Face models take as it is (0: attend, the dtype's
minimum: do not). Generation prefills the prompt with it, then decodes causally from the KV cache.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def attention_allowed(
    attention_mask: torch.Tensor, image_start: Sequence[int], image_tokens: int, bidirectional: bool = True
) -> torch.Tensor:
    """[B, T, T] booleans, query x key: causal, padding keys excluded, and (``bidirectional``) each sample's
    ``image_tokens`` positions from ``image_start`` (-1: no image) all visible to each other."""
    batch, length = attention_mask.shape
    index = torch.arange(length, device=attention_mask.device)
    allowed = (index[None, :] <= index[:, None]).expand(batch, length, length).clone()
    if bidirectional:
        start = torch.tensor(image_start, device=attention_mask.device)[:, None]
        image = (index[None] >= start) & (index[None] < start + image_tokens) & (start >= 0)
        allowed |= image[:, :, None] & image[:, None, :]
    return allowed & attention_mask.bool()[:, None, :]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Booleans [B, Q, K] -> the 4-D additive mask [B, 1, Q, K] a Hugging Face model takes as given."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (left padding does not shift them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_decode(
    lm: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
    eos_token_id: int, pad_token_id: int,
) -> torch.Tensor:
    """Greedy new tokens [B, <= max_new_tokens] for left-padded prompts: one forward over the prompts with the
    4-D ``mask``, then one cached step per token; rows that have ended get ``pad_token_id``."""
    position = positions(attention_mask)
    output = lm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position, use_cache=True)
    keys, next_position = attention_mask.long(), position[:, -1:] + 1
    done = torch.zeros(attention_mask.shape[0], dtype=torch.bool, device=attention_mask.device)
    tokens = []
    for _ in range(max_new_tokens):
        token = output.logits[:, -1].argmax(-1).masked_fill(done, pad_token_id)
        tokens.append(token)
        done |= token == eos_token_id
        if bool(done.all()):
            break
        keys = torch.cat([keys, torch.ones_like(keys[:, :1])], dim=1)
        step = additive_mask(keys.bool()[:, None, :], inputs_embeds.dtype)
        output = lm(input_ids=token[:, None], attention_mask=step, position_ids=next_position,
                    past_key_values=output.past_key_values, use_cache=True)
        next_position = next_position + 1
    return torch.stack(tokens, dim=1)
