"""The multimodal LM: a causal LM that reads one (pseudo-)image embedding as a prefix of visual tokens.

A projector (2-layer GELU MLP) maps the embedding to ``visual_tokens`` vectors in the LM's input space. A
LLaVA-style conversation (``[{"from": "human"|"gpt", "value": ...}]``, the first human turn holding the
``image_token`` placeholder) is rendered with the tokenizer's own chat template, tokenized piece by piece, and
the projected vectors replace the placeholder in ``inputs_embeds``. Labels are -100 everywhere except the
assistant answers and the end-of-turn marker that closes each one, so the loss teaches answering, not asking.

On disk (``save_mllm`` / ``load_mllm``) a checkpoint holds what was trained, not the frozen LM it ran on:
``projector.safetensors``, ``mllm.json`` (the config, with the identity of the encoder whose embeddings the
projector reads and of the base LM: its folder and a digest of its files), and for the LM only what changed:
nothing (stage 1, LM frozen), ``adapter/`` (peft LoRA weights) or ``lm/`` (a fully trained LM, or a model with
no recorded base). Loading rebuilds the whole model and refuses a base LM that is missing or not the one the
checkpoint was trained on. ``export_mllm`` writes a self-contained folder (``lm/`` with LoRA merged in).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from revision.config import ModelConfig, VoraConfig
from revision.errors import InputError
from revision.lm import lm_path, load_lm
from revision.outputs import tree_digest

IGNORE_INDEX = -100
IMAGE_SLOT_ID = -200  # marks visual positions in MLLMBatch.input_ids (never fed to the LM)
LM_DIR = "lm"
ADAPTER_DIR = "adapter"
PROJECTOR_FILE = "projector.safetensors"
CONFIG_FILE = "mllm.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

Conversation = Sequence[dict[str, str]]


@dataclass
class MLLMConfig:
    embed_dim: int  # pooled: the embedding's dim; grid: channels per cell
    visual_tokens: int = 4
    visual_input: str = "pooled"  # pooled | grid (revision.grid: one row holds visual_tokens cells) | pixels (VoRA)
    image_attention: str = "causal"  # causal | bidirectional (the visual tokens see each other: revision.attention)
    image_token: str = "<image>"
    encoder: dict[str, Any] = field(default_factory=dict)  # identity of the encoder that made the embeddings
    system_prompt: str | None = None  # None: whatever the chat template adds by itself
    caption_prompt: str = "Describe the image briefly."
    max_length: int | None = None  # truncate longer sequences (visual prefix included) from the right
    base_lm: dict[str, str] | None = None  # {"path", "digest"} of the LM folder the model was built on

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MLLMConfig:
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)


class Projector(nn.Module):
    """One embedding (dim d) -> ``visual_tokens`` x ``hidden_size`` prefix vectors."""

    def __init__(self, embed_dim: int, hidden_size: int, visual_tokens: int):
        super().__init__()
        self.visual_tokens, self.hidden_size = visual_tokens, hidden_size
        # Unit-norm embeddings have components ~1/sqrt(d); rescaling gives the first layer unit-variance inputs.
        self.input_scale = math.sqrt(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, visual_tokens * hidden_size)
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        prefix = self.mlp(embeddings * self.input_scale)
        return prefix.view(embeddings.shape[0], self.visual_tokens, self.hidden_size)


class GridProjector(nn.Module):
    """Grid features (``visual_tokens`` cells of dim d, flattened in one row) -> one prefix vector per cell,
    each through the same 2-layer GELU MLP (LLaVA-1.5's projector). The cells are raw tower features, so a
    LayerNorm without parameters gives the MLP unit-scale inputs."""

    def __init__(self, embed_dim: int, hidden_size: int, visual_tokens: int):
        super().__init__()
        self.visual_tokens, self.hidden_size, self.embed_dim = visual_tokens, hidden_size, embed_dim
        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cells = features.view(features.shape[0], self.visual_tokens, self.embed_dim)
        return self.mlp(self.norm(cells))


def projector_for(config: MLLMConfig, hidden_size: int) -> nn.Module:
    from revision.patches import PatchEmbedding

    kind = {"grid": GridProjector, "pixels": PatchEmbedding}.get(config.visual_input, Projector)
    return kind(config.embed_dim, hidden_size, config.visual_tokens)


@dataclass
class MLLMBatch:
    """LM inputs for a batch: right-padded, visual prefix spliced in at each sample's placeholder."""

    inputs_embeds: torch.Tensor  # (B, T, hidden)
    attention_mask: torch.Tensor  # (B, T), 0 on padding
    labels: torch.Tensor  # (B, T), IGNORE_INDEX except assistant answers
    input_ids: torch.Tensor  # (B, T), IMAGE_SLOT_ID at visual positions, pad id on padding
    image_start: list[int]  # index of each sample's first visual position (-1: a text-only sample)


@dataclass
class _Piece:
    """A run of the rendered conversation: token ids (with a label flag) or the visual prefix slot."""

    token_ids: list[int]
    is_answer: bool = False
    is_image: bool = False


class MLLM(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer: Any, config: MLLMConfig, projector: Projector | None = None):
        super().__init__()
        self.lm, self.tokenizer, self.config = lm, tokenizer, config
        hidden_size = lm.get_input_embeddings().embedding_dim
        self.projector = projector or projector_for(config, hidden_size)
        self.projector.to(device=_device_of(lm), dtype=lm.get_input_embeddings().weight.dtype)

    @property
    def device(self) -> torch.device:
        return _device_of(self.lm)

    def forward(self, embeddings: torch.Tensor, conversations: Sequence[Conversation]) -> torch.Tensor:
        """Mean cross-entropy over the assistant answer tokens of the batch."""
        logits, targets, _, _ = self._answer_logits(self.build_inputs(embeddings, conversations))
        return nn.functional.cross_entropy(logits.float(), targets)

    def loss_and_visual_states(
        self, embeddings: torch.Tensor, conversations: Sequence[Conversation]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s loss and the LM's final hidden states at the visual positions, [B, visual_tokens, hidden]."""
        loss, batch, states = self.loss_and_states(embeddings, conversations)
        return loss, self.at_visual_positions(batch, states[-1])

    def loss_and_states(
        self, embeddings: torch.Tensor, conversations: Sequence[Conversation], has_image: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MLLMBatch, tuple[torch.Tensor, ...]]:
        """``forward``'s loss, the batch, and the LM's hidden states (index 0: its input, i: after i layers).
        ``has_image`` (bool per sample, default all true): a false sample is text only, its embedding unused."""
        batch = self.build_inputs(embeddings, conversations, has_image)
        logits, targets, _, output = self._answer_logits(batch, output_hidden_states=True)
        return nn.functional.cross_entropy(logits.float(), targets), batch, output.hidden_states

    def at_visual_positions(self, batch: MLLMBatch, states: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """``states`` [B, T, ...] at the visual positions of each sample (of ``rows``, the samples with an image,
        when some have none): [B or len(rows), visual_tokens, ...]."""
        rows = list(range(states.shape[0])) if rows is None else list(rows)
        start = torch.tensor([batch.image_start[row] for row in rows], device=states.device, dtype=torch.long)[:, None]
        visual = start + torch.arange(self.config.visual_tokens, device=states.device)
        return states[torch.tensor(rows, device=states.device, dtype=torch.long)[:, None], visual]

    def logits(self, embeddings: torch.Tensor, conversations: Sequence[Conversation]) -> torch.Tensor:
        batch = self.build_inputs(embeddings, conversations)
        return self._lm_forward(batch).logits

    def answer_nll(self, embeddings: torch.Tensor, conversations: Sequence[Conversation]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per conversation: the summed NLL of its answer tokens and how many there are (CPU tensors)."""
        sums, counts, _ = self.answer_scores(embeddings, conversations)
        return sums, counts

    @torch.no_grad()
    def answer_scores(
        self, embeddings: torch.Tensor, conversations: Sequence[Conversation]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``answer_nll`` and, per conversation, whether greedy decoding would produce its answer tokens."""
        logits, targets, rows, _ = self._answer_logits(self.build_inputs(embeddings, conversations))
        nll = nn.functional.cross_entropy(logits.float(), targets, reduction="none").cpu()
        missed = (logits.argmax(-1) != targets).cpu().double()
        n, rows = len(conversations), rows.cpu()
        sums, counts = torch.zeros(n).index_add_(0, rows, nll), torch.bincount(rows, minlength=n)
        return sums, counts, torch.bincount(rows, weights=missed, minlength=n) == 0

    def conversation(self, question: str | None, answer: str | None = None) -> Conversation:
        """The turns the model is asked in: the image and ``question`` (the caption prompt when None), then
        ``answer`` when given."""
        turns = [{"from": "human", "value": self._question_with_image(question)}]
        return turns + [{"from": "gpt", "value": answer}] if answer is not None else turns

    def build_inputs(
        self, embeddings: torch.Tensor, conversations: Sequence[Conversation], has_image: torch.Tensor | None = None
    ) -> MLLMBatch:
        if embeddings.ndim != 2 or embeddings.shape[0] != len(conversations):
            shape = tuple(embeddings.shape)
            raise InputError(f"need one embedding per conversation, got {shape} for {len(conversations)}")
        prefixes = self._project(embeddings)
        images = [True] * len(conversations) if has_image is None else [bool(flag) for flag in has_image]
        samples = [self._pieces(_as_messages(conv, self.config), image=image) for conv, image in zip(conversations, images)]
        return self._collate(samples, prefixes, pad_left=False)

    @torch.no_grad()
    def generate(self, embedding: torch.Tensor, question: str | None = None, max_new_tokens: int = 32) -> str:
        """Greedy answer to ``question`` about one embedding (a caption when ``question`` is None)."""
        return self.generate_batch(embedding.reshape(1, -1), [question], max_new_tokens)[0]

    @torch.no_grad()
    def generate_batch(
        self, embeddings: torch.Tensor, questions: Sequence[str | None] | None = None, max_new_tokens: int = 32
    ) -> list[str]:
        """Greedy answers for a batch (left-padded so every prompt ends where generation starts)."""
        questions = list(questions) if questions is not None else [None] * embeddings.shape[0]
        prefixes = self._project(embeddings)
        prompts = [_as_messages(self.conversation(question), self.config) for question in questions]
        samples = [self._pieces(messages, generation_prompt=True) for messages in prompts]
        batch = self._collate(samples, prefixes, pad_left=True)
        if self.config.image_attention == "bidirectional":
            from revision.attention import greedy_decode

            output = greedy_decode(self.lm, batch.inputs_embeds, batch.attention_mask, self._attention(batch),
                                   max_new_tokens, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)  # fmt: skip
            return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
        output = self.lm.generate(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )  # fmt: skip
        # With inputs_embeds only, decoder-only generate returns just the new tokens.
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def _question_with_image(self, question: str | None) -> str:
        text = question if question is not None else self.config.caption_prompt
        return text if self.config.image_token in text else f"{self.config.image_token}\n{text}"

    def _project(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.projector(embeddings.to(self.device, next(self.projector.parameters()).dtype))

    def _lm_forward(self, batch: MLLMBatch, **kwargs: Any) -> Any:
        if self.config.image_attention == "bidirectional":
            from revision.attention import positions

            kwargs["position_ids"] = positions(batch.attention_mask)
        return self.lm(inputs_embeds=batch.inputs_embeds, attention_mask=self._attention(batch), **kwargs)

    def _attention(self, batch: MLLMBatch) -> torch.Tensor:
        """The 2-D padding mask (the LM makes it causal), or the 4-D mask with bidirectional visual tokens."""
        if self.config.image_attention != "bidirectional":
            return batch.attention_mask
        from revision.attention import additive_mask, attention_allowed

        allowed = attention_allowed(batch.attention_mask, batch.image_start, self.config.visual_tokens)
        return additive_mask(allowed, batch.inputs_embeds.dtype)

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

    def _pieces(self, messages: list[dict[str, str]], generation_prompt: bool = False, image: bool = True) -> list[_Piece]:
        """The conversation's runs; it must hold one placeholder (none when it is text only: ``image`` false)."""
        pieces: list[_Piece] = []
        for text, is_answer in _segments(self.tokenizer, messages, generation_prompt):
            if is_answer:
                pieces.append(_Piece(self._encode(text), is_answer=True))
                continue
            before, *after = text.split(self.config.image_token)
            pieces.append(_Piece(self._encode(before)))
            for rest in after:
                pieces += [_Piece([], is_image=True), _Piece(self._encode(rest))]
        if sum(piece.is_image for piece in pieces) != image:
            wanted = "exactly one" if image else "no"
            raise InputError(f"a conversation {'with' if image else 'without'} an image needs {wanted} "
                             f"{self.config.image_token!r} placeholder: {messages}")  # fmt: skip
        return pieces

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _collate(self, samples: list[list[_Piece]], prefixes: torch.Tensor, pad_left: bool) -> MLLMBatch:
        rows = [self._sample_row(pieces, prefix) for pieces, prefix in zip(samples, prefixes)]
        width = max(embeds.shape[0] for embeds, *_ in rows)
        hidden = prefixes.shape[-1]
        batch_size = len(rows)
        inputs_embeds = prefixes.new_zeros(batch_size, width, hidden)
        attention_mask = torch.zeros(batch_size, width, dtype=torch.long, device=self.device)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long, device=self.device)
        input_ids = torch.full((batch_size, width), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        image_start = []
        for i, (embeds, ids, row_labels, start) in enumerate(rows):
            offset = width - embeds.shape[0] if pad_left else 0
            span = slice(offset, offset + embeds.shape[0])
            inputs_embeds[i, span], attention_mask[i, span] = embeds, 1
            labels[i, span], input_ids[i, span] = row_labels, ids
            image_start.append(offset + start if start >= 0 else -1)
        return MLLMBatch(inputs_embeds, attention_mask, labels, input_ids, image_start)

    def _sample_row(
        self, pieces: list[_Piece], prefix: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(embeddings, ids with IMAGE_SLOT_ID at visual positions, labels, image start: -1 without one) of one
        sample."""
        ids, labels, parts, image_start = [], [], [], -1
        embed_tokens = self.lm.get_input_embeddings()
        for piece in pieces:
            if piece.is_image:
                image_start = len(ids)
                ids += [IMAGE_SLOT_ID] * prefix.shape[0]
                labels += [IGNORE_INDEX] * prefix.shape[0]
                parts.append(prefix)
            elif piece.token_ids:
                ids += piece.token_ids
                labels += piece.token_ids if piece.is_answer else [IGNORE_INDEX] * len(piece.token_ids)
                parts.append(embed_tokens(torch.tensor(piece.token_ids, device=self.device)))
        limit = self.config.max_length or len(ids)
        ids_t = torch.tensor(ids[:limit], device=self.device)
        labels_t = torch.tensor(labels[:limit], device=self.device)
        return torch.cat(parts)[:limit], ids_t, labels_t, image_start


def _as_messages(conversation: Conversation, config: MLLMConfig) -> list[dict[str, str]]:
    """LLaVA turns -> chat-template messages (with the configured system prompt, if any)."""
    messages = [{"role": "system", "content": config.system_prompt}] if config.system_prompt is not None else []
    for turn in conversation:
        role = ROLES.get(turn.get("from", turn.get("role", "")))
        if role is None:
            raise InputError(f"unknown conversation role in turn {turn}; expected one of {sorted(ROLES)}")
        messages.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
    return messages


def _segments(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) runs.

    Each answer run is an assistant turn's content plus the end-of-turn marker the template puts after it
    (trailing whitespace such as the newline after `<|im_end|>` stays unlabelled). Works for any template that
    renders a conversation as the concatenation of its turns.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise InputError("the tokenizer's chat template does not render conversations turn by turn")
        answer_end = len(full.rstrip())
        segments += [(prompt[len(done) :], False), (full[len(prompt) : answer_end], True)]
        done = full[:answer_end]
    if generation_prompt:
        segments.append((_render(tokenizer, messages, add_generation_prompt=True)[len(done) :], False))
    elif not segments:
        raise InputError(f"conversation has no assistant turn to learn from: {messages}")
    return segments


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def new_mllm(
    lm_dir: Path, model_cfg: ModelConfig, encoder: dict, max_length: int, cell_dim: int | None = None,
    vora: VoraConfig | None = None,
) -> MLLM:  # fmt: skip
    """A fresh MLLM: the LM prepared by the lm stage and a new projector for ``encoder``'s embeddings, or with
    ``model_cfg.visual_input: grid`` for grid features of ``cell_dim`` channels per cell (``revision.grid``),
    or with ``pixels`` a patch embedding of the ``vora`` settings (``revision.patches``)."""
    folder = lm_path(lm_dir)
    lm, tokenizer = load_lm(folder, trust_remote_code=model_cfg.trust_remote_code)
    kind = model_cfg.visual_input
    if (kind == "grid" and cell_dim is None) or (kind == "pixels" and vora is None):
        raise ValueError(f"a {kind} model needs {'the channels per cell of its grid features' if kind == 'grid' else 'its vora settings'}")
    embed_dim, tokens, attention = encoder["dim"], model_cfg.visual_tokens, "causal"
    if kind == "grid":
        embed_dim, tokens = cell_dim, model_cfg.grid**2
    elif kind == "pixels":
        tokens, attention = (vora.image_size // vora.patch) ** 2, vora.attention
    config = MLLMConfig(
        embed_dim=embed_dim, visual_tokens=tokens, visual_input=kind, image_attention=attention, encoder=encoder,
        system_prompt=model_cfg.system_prompt, max_length=max_length, base_lm=lm_identity(folder),
    )  # fmt: skip
    return MLLM(lm, tokenizer, config)


def freeze_lm(model: MLLM) -> MLLM:
    """Stage 1: only the projector learns."""
    model.lm.requires_grad_(False)
    return model


def add_lora(
    model: MLLM, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules: Sequence[str] | str = "all-linear"
) -> MLLM:
    """Wrap the LM in peft LoRA adapters (the projector stays fully trainable)."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    model.lm = get_peft_model(model.lm, lora)
    return model


def lm_identity(folder: Path) -> dict[str, str]:
    """Where an LM folder is and a digest of every file in it (weights, config, tokenizer)."""
    return {"path": str(folder), "digest": tree_digest(folder)}


def trained_lm_part(model: MLLM) -> str:
    """What of the LM training changed: ``adapter`` (LoRA), ``full`` (any base weight trainable) or ``none``."""
    if hasattr(model.lm, "peft_config"):
        return "adapter"
    return "full" if any(p.requires_grad for p in model.lm.parameters()) else "none"


def save_mllm(model: MLLM, out_dir: str | Path, self_contained: bool = False) -> Path:
    """The projector, mllm.json and what of the LM was trained (see the module docstring). A model with no
    recorded base LM, or ``self_contained``, gets the whole LM (LoRA merged in) under ``lm/``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    part = trained_lm_part(model)
    if self_contained or model.config.base_lm is None or part == "full":
        _plain_lm(model.lm).save_pretrained(out_dir / LM_DIR, safe_serialization=True)
        model.tokenizer.save_pretrained(out_dir / LM_DIR)
    elif part == "adapter":
        model.lm.save_pretrained(out_dir / ADAPTER_DIR, safe_serialization=True)
        _record_base_path(out_dir / ADAPTER_DIR, model.config.base_lm["path"])
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.projector.state_dict().items()}
    save_file(state, str(out_dir / PROJECTOR_FILE))
    config = {**asdict(model.config), "hidden_size": model.projector.hidden_size}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def checkpoint_config(checkpoint: Path) -> MLLMConfig:
    """A checkpoint's mllm.json, read without loading the model (so a mismatch fails before any is loaded)."""
    config_path = checkpoint / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{checkpoint} is not an MLLM folder (no {CONFIG_FILE})")
    return MLLMConfig.from_dict(json.loads(config_path.read_text()))


def load_mllm(path: str | Path, device: str | torch.device = "cpu") -> MLLM:
    """The whole model a checkpoint describes: its own ``lm/``, or its base LM (checked against the recorded
    digest) with the ``adapter/`` merged in when there is one."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise InputError(f"{path} is not an MLLM folder (no {CONFIG_FILE})")
    values = json.loads((path / CONFIG_FILE).read_text())
    config = MLLMConfig.from_dict(values)
    if (path / LM_DIR).is_dir():
        lm, tokenizer = load_lm(path / LM_DIR)
    else:
        lm, tokenizer = load_lm(_base_lm_folder(path, config.base_lm))
        if (path / ADAPTER_DIR).is_dir():
            from peft import PeftModel

            lm = PeftModel.from_pretrained(lm, path / ADAPTER_DIR).merge_and_unload()
            config.base_lm = None  # no longer the recorded base: saved again, this LM is written whole
    projector = projector_for(config, values["hidden_size"])
    projector.load_state_dict(load_file(str(path / PROJECTOR_FILE)))
    return MLLM(lm.to(device), tokenizer, config, projector)


def export_mllm(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A self-contained copy of ``checkpoint``: the whole LM (LoRA merged) under ``lm/``, no base LM needed."""
    return save_mllm(load_mllm(checkpoint), out_dir, self_contained=True)


def _record_base_path(adapter_dir: Path, base_path: str) -> None:
    # peft records where the LM was loaded from (an absolute path of this checkout, when read beside a
    # checkpoint) in its config and in a generated model card, and lists the target modules in set order; the
    # base as the checkpoint records it and a sorted list keep the saved bytes the same wherever the stage ran
    config = adapter_dir / "adapter_config.json"
    values = json.loads(config.read_text())
    values["base_model_name_or_path"] = base_path
    if isinstance(values.get("target_modules"), list):  # peft keeps a set: its order follows the hash seed
        values["target_modules"] = sorted(values["target_modules"])
    config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").unlink(missing_ok=True)


def _base_lm_folder(checkpoint: Path, base: dict | None) -> Path:
    if not base:
        raise InputError(f"{checkpoint}: has neither {LM_DIR}/ nor a recorded base LM in {CONFIG_FILE}")
    folder = Path(base["path"])
    if not folder.is_absolute():  # data/lm as a stage saw it: that of the checkout holding the checkpoint first
        folder = next((root / folder for root in checkpoint.resolve().parents if (root / folder).is_dir()), folder)
    if not folder.is_dir():
        raise InputError(f"{checkpoint}: its base LM {folder} is missing; run `revision lm` (or `dvc pull`) to "
                         f"rebuild it, or `revision export` the checkpoint where the base LM is")
    if tree_digest(folder) != base["digest"]:
        raise InputError(f"{checkpoint}: the LM at {folder} is not the one it was trained on (its files differ "
                         f"from digest {base['digest'][:12]}); re-run the training stages on this LM")
    return folder


def _plain_lm(lm: nn.Module) -> nn.Module:
    # A LoRA-wrapped LM is saved with its adapters merged, so loading needs no peft. Merging a copy leaves the
    # model being trained untouched (at the cost of one LM copy in memory while saving).
    if hasattr(lm, "merge_and_unload"):
        return copy.deepcopy(lm).merge_and_unload()
    return lm
