"""``revision``, an lmms-eval model: any checkpoint of this project scored by the community's harness.

Registered through the entry-point group ``lmms_eval.models`` (pyproject.toml), so with the ``lmms`` extra
installed ``python -m lmms_eval --model revision --model_args pretrained=data/finetune,encoder=data/encoder``
finds it. Each image goes through the frozen encoder the checkpoint was trained on (checked against the
identity the checkpoint records) and its embedding into the projector, as in ``revision chat``; prompts go
through the checkpoint's own chat template (``MLLM.conversation``). An empty context means the checkpoint's
caption prompt. Decoding is greedy. Under ``accelerate launch`` each process takes the harness's share of the
requests on its own device.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger

from revision import layout
from revision.errors import InputError

MODEL_ID = "revision"


def manifest():
    """The entry point's payload (imported by lmms-eval when it builds its model registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.RevisionModel")


class RevisionModel(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str = str(layout.FINETUNE),
        encoder: str = str(layout.ENCODER),
        batch_size: int | str = 8,
        max_new_tokens: int = 32,
        device: str | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        from revision.checkpoints import load_mllm

        if unknown:
            raise InputError(f"revision model: unknown --model_args {sorted(unknown)}; it takes pretrained, encoder, "
                             "batch_size, max_new_tokens, device")
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = torch.device(device) if device and self._world_size == 1 else self.accelerator.device
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not supported
        self.max_new_tokens = int(max_new_tokens)
        self.model = load_mllm(pretrained, self._device).eval()
        self.model.config.max_length = None  # score whole continuations, whatever budget training used
        fix = "pass the encoder it was trained on: --model_args ...,encoder=<folder>"
        config = self.model.config
        self.encoder = config.visual.reader(Path(encoder), config.encoder, f"{pretrained} (trained)", fix, self._device)
        self._warned_sampling = False

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, ``batch_size`` prompts at a time among requests with the same token budget; each
        answer is cut at the first of its ``until`` strings."""
        budgets = [self._budget(request.args[1]) for request in requests]
        answers: list[str] = [""] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: (budgets[i], i))
        for budget, group in groupby(order, key=lambda i: budgets[i]):
            group = list(group)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                vectors = self._embed([requests[i] for i in chunk])
                contexts = [requests[i].args[0] or None for i in chunk]
                for i, text in zip(chunk, self.model.generate(vectors, contexts, budget)):
                    answers[i] = _cut(text, requests[i].args[1].get("until"))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation as the assistant's answer (end-of-turn marker included, as in
        ``MLLM.answer_scores``), and whether greedy decoding would produce it."""
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            conversations = []
            for request in chunk:
                context, continuation, _, doc_id, task, split = request.args
                if callable(continuation):
                    continuation = continuation(self.task_dict[task][split][doc_id])
                # the harness puts a space before a continuation for plain-text LMs; here it is its own turn
                conversations.append(self.model.conversation(context or None, str(continuation).lstrip()))
            sums, _, greedy = self.model.answer_scores(self._embed(chunk), conversations)
            results += [(-float(total), bool(hit)) for total, hit in zip(sums, greedy)]
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the revision model answers one turn per image; multi-round tasks are not supported")

    def _embed(self, requests: list[Instance]) -> torch.Tensor:
        images = []
        for request in requests:
            doc_to_visual, doc_id, task, split = request.args[2:6]
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if len(visuals) != 1:
                raise InputError(f"{task} ({split}) doc {doc_id}: the revision model reads one image per prompt, "
                                 f"got {len(visuals)}")
            images.append(visuals[0].convert("RGB"))
        return self.encoder.encode_images(images)

    def _budget(self, gen_kwargs: dict) -> int:
        if (gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0) and not self._warned_sampling:
            logger.warning("revision model: sampling was asked for; it decodes greedily")
            self._warned_sampling = True
        return int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))


def _cut(text: str, until: str | list[str] | None) -> str:
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop)[0]
    return text.strip()
