"""The multimodal LM: a causal LM that reads an image as a prefix of visual tokens.

The visual input (``revision.visual_input``: a pooled embedding, grid features or pixels) has its own projector
into the LM's input space; ``revision.conversations`` renders the conversations and splices the projected
prefix in at each placeholder. One entry point per use: ``forward`` for training (the loss on the assistant
answers, with the batch and the LM's hidden states for objectives that read them), ``answer_scores`` for
teacher-forced scoring, ``generate`` for greedy answers. ``revision.checkpoints`` saves and loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from revision import attention
from revision.config import ModelConfig
from revision.conversations import (
    IGNORE_INDEX,
    Conversation,
    MLLMBatch,
    as_messages,
    ask,
    collate,
    pieces,
)
from revision.errors import InputError
from revision.lm import lm_identity, lm_path, load_lm
from revision.visual_input import VisualInput, from_fields


@dataclass
class MLLMConfig:
    visual: VisualInput  # what the model reads of an image, and its geometry
    image_attention: str = "causal"  # causal | bidirectional (the visual tokens see each other: revision.attention)
    image_token: str = "<image>"
    encoder: dict[str, Any] = field(default_factory=dict)  # identity of the encoder that made the embeddings
    system_prompt: str | None = None  # None: whatever the chat template adds by itself
    caption_prompt: str = "Describe the image briefly."
    max_length: int | None = None  # truncate longer sequences (visual prefix included) from the right
    base_lm: dict[str, str] | None = None  # {"path", "digest"} of the LM folder the model was built on
    precision: dict[str, str] = field(default_factory=dict)  # training stage -> what it computed in (no: fp32)

    def to_dict(self) -> dict[str, Any]:
        """What mllm.json holds: the visual input's fields, then the rest."""
        rest = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "visual"}
        return {**self.visual.fields, **rest}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MLLMConfig:
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values and name != "visual"}
        return cls(visual=from_fields(values), **known)


class MLLMOutput(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy over the assistant answer tokens of the batch
    batch: MLLMBatch
    hidden_states: tuple[torch.Tensor, ...]  # index 0: the LM's input, i: after i layers


class MLLM(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer: Any, config: MLLMConfig, projector: nn.Module | None = None):
        super().__init__()
        self.lm, self.tokenizer, self.config = lm, tokenizer, config
        hidden_size = lm.get_input_embeddings().embedding_dim
        self.projector = projector or config.visual.projector(hidden_size)
        self.projector.to(device=_device_of(lm), dtype=lm.get_input_embeddings().weight.dtype)

    @property
    def device(self) -> torch.device:
        return _device_of(self.lm)

    def forward(
        self, vectors: torch.Tensor, conversations: Sequence[Conversation], has_image: torch.Tensor | None = None
    ) -> MLLMOutput:
        """The loss on the answers, the batch and the LM's hidden states. ``has_image`` (bool per sample, default
        all true): a false sample is text only, its row of ``vectors`` unused."""
        batch = self.build_inputs(vectors, conversations, has_image)
        logits, targets, _, output = self._answer_logits(batch, output_hidden_states=True)
        return MLLMOutput(nn.functional.cross_entropy(logits.float(), targets), batch, output.hidden_states)

    def visual_states(self, batch: MLLMBatch, states: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """``states`` [B, T, ...] at the visual positions of each sample (of ``rows``, the samples with an image,
        when some have none): [B or len(rows), visual tokens, ...]."""
        rows = list(range(states.shape[0])) if rows is None else list(rows)
        start = torch.tensor([batch.image_start[row] for row in rows], device=states.device, dtype=torch.long)[:, None]
        visual = start + torch.arange(self.config.visual.tokens, device=states.device)
        return states[torch.tensor(rows, device=states.device, dtype=torch.long)[:, None], visual]

    @torch.no_grad()
    def answer_scores(
        self, vectors: torch.Tensor, conversations: Sequence[Conversation]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per conversation (CPU tensors): the summed NLL of its answer tokens, how many there are, and whether
        greedy decoding would produce them."""
        logits, targets, rows, _ = self._answer_logits(self.build_inputs(vectors, conversations))
        nll = nn.functional.cross_entropy(logits.float(), targets, reduction="none").cpu()
        missed = (logits.argmax(-1) != targets).cpu().double()
        n, rows = len(conversations), rows.cpu()
        sums, counts = torch.zeros(n).index_add_(0, rows, nll), torch.bincount(rows, minlength=n)
        return sums, counts, torch.bincount(rows, weights=missed, minlength=n) == 0

    def conversation(self, question: str | None, answer: str | None = None) -> Conversation:
        """The turns the model is asked in: the image and ``question`` (the caption prompt when None), then
        ``answer`` when given."""
        return ask(question if question is not None else self.config.caption_prompt, self.config.image_token, answer)

    def build_inputs(
        self, vectors: torch.Tensor, conversations: Sequence[Conversation], has_image: torch.Tensor | None = None
    ) -> MLLMBatch:
        if vectors.ndim != 2 or vectors.shape[0] != len(conversations):
            shape = tuple(vectors.shape)
            raise InputError(f"need one embedding per conversation, got {shape} for {len(conversations)}")
        images = [True] * len(conversations) if has_image is None else [bool(flag) for flag in has_image]
        samples = [self._pieces(conv, image=image) for conv, image in zip(conversations, images)]
        return self._collate(samples, self._project(vectors), pad_left=False)

    @torch.no_grad()
    def generate(
        self, vectors: torch.Tensor, questions: Sequence[str | None] | None = None, max_new_tokens: int = 32
    ) -> list[str]:
        """Greedy answers for a batch (a caption where a question is None), left-padded so every prompt ends where
        generation starts."""
        questions = list(questions) if questions is not None else [None] * vectors.shape[0]
        samples = [self._pieces(self.conversation(question), generation_prompt=True) for question in questions]
        batch = self._collate(samples, self._project(vectors), pad_left=True)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if self.config.image_attention == "bidirectional":
            output = attention.greedy_decode(
                self.lm, batch.inputs_embeds, batch.attention_mask, self._attention(batch), max_new_tokens, eos, pad
            )
        else:  # with inputs_embeds only, decoder-only generate returns just the new tokens
            output = self.lm.generate(
                inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def _pieces(self, conversation: Conversation, generation_prompt: bool = False, image: bool = True):
        messages = as_messages(conversation, self.config.system_prompt)
        return pieces(self.tokenizer, messages, self.config.image_token, generation_prompt, image)

    def _collate(self, samples: list, prefixes: torch.Tensor, pad_left: bool) -> MLLMBatch:
        embed_tokens = self.lm.get_input_embeddings()
        return collate(samples, prefixes, embed_tokens, self.tokenizer.pad_token_id, self.config.max_length, pad_left)

    def _project(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.projector(vectors.to(self.device, next(self.projector.parameters()).dtype))

    def _lm_forward(self, batch: MLLMBatch, **kwargs: Any) -> Any:
        if self.config.image_attention == "bidirectional":
            kwargs["position_ids"] = attention.positions(batch.attention_mask)
        return self.lm(inputs_embeds=batch.inputs_embeds, attention_mask=self._attention(batch), **kwargs)

    def _attention(self, batch: MLLMBatch) -> torch.Tensor:
        """The 2-D padding mask (the LM makes it causal), or the 4-D mask with bidirectional visual tokens."""
        if self.config.image_attention != "bidirectional":
            return batch.attention_mask
        allowed = attention.attention_allowed(batch.attention_mask, batch.image_start, self.config.visual.tokens)
        return attention.additive_mask(allowed, batch.inputs_embeds.dtype)

    def _answer_logits(self, batch: MLLMBatch, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """Logits at the positions that predict an answer token, those tokens, their batch rows, and the LM's
        whole output (``kwargs`` go to the LM). The LM head runs only there: over a 49k vocabulary it is a fifth
        of a small LM's cost per position."""
        predicts = torch.zeros_like(batch.labels, dtype=torch.bool)
        predicts[:, :-1] = batch.labels[:, 1:] != IGNORE_INDEX
        output = self._lm_forward(batch, logits_to_keep=predicts, **kwargs)
        logits = output.logits
        if logits.ndim == 3:  # a model that ignores logits_to_keep
            logits = logits[predicts.to(logits.device)]
        return logits, batch.labels[:, 1:][predicts[:, :-1]].to(logits.device), predicts.nonzero()[:, 0], output


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def new_mllm(lm_dir: Path, model_cfg: ModelConfig, visual: VisualInput, encoder: dict, max_length: int, attention: str) -> MLLM:
    """A fresh MLLM: the LM prepared by the lm stage and a new projector for ``visual`` (rows made by ``encoder``)."""
    folder = lm_path(lm_dir)
    lm, tokenizer = load_lm(folder, trust_remote_code=model_cfg.trust_remote_code)
    config = MLLMConfig(
        visual=visual, image_attention=attention, encoder=encoder, system_prompt=model_cfg.system_prompt,
        max_length=max_length, base_lm=lm_identity(folder),
    )
    return MLLM(lm, tokenizer, config)


def freeze_lm(model: MLLM) -> MLLM:
    """Stage 1: only the projector learns."""
    model.lm.requires_grad_(False)
    return model


def add_lora(
    model: MLLM, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules: Sequence[str] | str = "all-linear"
) -> MLLM:
    """Wrap the LM in peft LoRA adapters (the projector stays fully trainable)."""
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    model.lm = get_peft_model(model.lm, lora)
    return model
