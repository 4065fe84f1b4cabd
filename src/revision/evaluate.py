"""Scoring an MLLM on the held-out eval set: captions, VQA, POPE object probes, garment classes, caption NLL.

Everything the model is asked is drawn once per eval set (``load_eval_set``), so every checkpoint answers
exactly the same prompts about the same images. Generation is greedy through ``MLLM.generate``.

- captions: one per image (the checkpoint's caption prompt), scored against all references with the COCO
  caption metrics (BLEU-4, METEOR, ROUGE-L, CIDEr on PTB-tokenized text; SPICE needs a download, so it is out);
- VQA: exact match after normalization, overall and per question type;
- POPE: "Is there a {shape} in the image?" for the true shape and one other shape of each easy-VQA image;
- garment accuracy: the Fashion-MNIST class a generated caption names;
- caption NLL: mean per-token negative log-likelihood of each image's first reference caption, and the same
  with every caption paired with another eval image (``image_gain`` is the difference: what the image is worth);
- ranked probes: each image's first reference caption with its garment class, colour or shape against the
  same caption naming a seeded other one; the model "answers" with the more likely of the two (``rank_*_acc``,
  chance 0.5, and the mean NLL margin ``rank_*_margin``), so an attribute the model reads from the image
  counts even before it is fluent enough to generate it.

Every metric has its standard error beside it (``<metric>_se``, ``revision.standard_errors``) and its item count
(``n_images``, ``n_vqa``, ``n_vqa_<type>``, ``n_pope``, ``n_garment``, ``n_rank_*``).
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from revision import standard_errors
from revision.captions import COLOUR_WORDS, EXISTENCE_QUESTION, GARMENT_WORDS, SHAPE_WORDS
from revision.checkpoints import checkpoint_config
from revision.config import EvaluateConfig
from revision.embedding_sets import EmbeddingSet
from revision.encoder_identity import require_same_encoder
from revision.errors import InputError
from revision.layout import EVAL, read_manifest
from revision.mllm import MLLM
from revision.sources import EASYVQA_COLOURS, EASYVQA_SHAPES
from revision.training_data import subsample, vectors_by_id

CAPTION_METRICS = ("bleu4", "meteor", "rouge_l", "cider")
# probe -> (source, attribute, the phrases naming each value: the first is the one candidates use)
RANKED_PROBES = {
    "garment": ("fashion_mnist", "class_name", GARMENT_WORDS),
    "colour": ("easyvqa", "colour", {c: COLOUR_WORDS.get(c, [c]) for c in sorted(EASYVQA_COLOURS)}),
    "shape": ("easyvqa", "shape", SHAPE_WORDS),
}


@dataclass(frozen=True)
class EvalImage:
    id: str
    source: str
    captions: list[str]
    attrs: dict
    qas: list[dict] = field(default_factory=list)  # every QA of the image, as in eval.parquet
    image: str = ""  # the image file, relative to the prepared folder


@dataclass(frozen=True)
class Question:
    image: int  # index into EvalSet.images
    kind: str  # "vqa" | "pope"
    text: str
    answer: str
    type: str  # colour | shape | yes_no | garment for VQA; "pope" for probes


@dataclass
class EvalSet:
    images: list[EvalImage]
    vectors: torch.Tensor  # one embedding per image, in image order
    questions: list[Question]


# ---------------------------------------------------------------- the eval set


def load_eval_set(prepared: Path, embeddings: EmbeddingSet, cfg: EvaluateConfig) -> EvalSet:
    """The seeded image subsample, its embeddings and the questions every checkpoint will be asked."""
    images, rows = eval_images(prepared, cfg)
    vectors = vectors_by_id(embeddings, [image.id for image in images], prepared / EVAL.file, rows)
    return EvalSet(images, torch.from_numpy(vectors), eval_questions(images, cfg))


def eval_images(prepared: Path, cfg: EvaluateConfig) -> tuple[list[EvalImage], list[int]]:
    """The seeded subsample of eval.parquet and its rows there."""
    table = read_manifest(prepared, EVAL)
    rows = subsample(len(table), cfg.max_images, cfg.seed)
    images = [_eval_image(row) for row in table.iloc[rows].itertuples(index=False)]
    if not images:
        raise InputError(f"{prepared / EVAL.file}: no eval images")
    return images, rows


def eval_questions(images: Sequence[EvalImage], cfg: EvaluateConfig) -> list[Question]:
    return vqa_questions(images, cfg.max_questions, cfg.seed) + pope_questions(images, cfg.seed)


def _eval_image(row) -> EvalImage:
    captions = [str(c) for c in (row.captions if row.captions is not None else [])]
    if not captions:
        raise InputError(f"eval image {row.id!r} has no reference captions")
    attrs = json.loads(row.attrs) if isinstance(row.attrs, str) and row.attrs else {}
    qas = json.loads(row.questions) if isinstance(row.questions, str) and row.questions else []
    return EvalImage(str(row.id), str(row.source), captions, attrs, qas, str(row.image))


def vqa_questions(images: Sequence[EvalImage], per_image: int, seed: int) -> list[Question]:
    rng = random.Random(f"{seed}-vqa")
    questions = []
    for index, image in enumerate(images):
        for qa in rng.sample(image.qas, min(per_image, len(image.qas))):
            questions.append(Question(index, "vqa", qa["question"], qa["answer"], qa["type"]))
    return questions


def pope_questions(images: Sequence[EvalImage], seed: int) -> list[Question]:
    """One "yes" probe (the true shape) and one "no" probe (a seeded other shape) per easy-VQA image."""
    # Its own generator, so changing max_questions leaves the probes as they were.
    rng = random.Random(f"{seed}-pope")
    questions = []
    for index, image in enumerate(images):
        shape = image.attrs.get("shape")
        if image.source != "easyvqa" or shape not in EASYVQA_SHAPES:
            continue
        absent = rng.choice(sorted(EASYVQA_SHAPES - {shape}))
        questions.append(Question(index, "pope", EXISTENCE_QUESTION.format(thing=shape), "yes", "pope"))
        questions.append(Question(index, "pope", EXISTENCE_QUESTION.format(thing=absent), "no", "pope"))
    return questions


def check_checkpoint_encoder(checkpoint: Path, embeddings: EmbeddingSet) -> None:
    """The checkpoint's projector must read embeddings of the encoder that made the eval set."""
    trained_on = checkpoint_config(checkpoint).encoder
    fix = "evaluate with that encoder's embeddings"
    require_same_encoder(trained_on, f"{checkpoint} (trained)", embeddings.encoder, embeddings.dir, fix)


# ---------------------------------------------------------------- scorers


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: "A T-shirt." -> "a t shirt"."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def answer_matches(prediction: str, answer: str) -> bool:
    """Exact match after normalization, or the prediction starts with the answer as whole words."""
    prediction, answer = normalize_answer(prediction), normalize_answer(answer)
    return bool(answer) and (prediction == answer or prediction.startswith(answer + " "))


def yes_no(prediction: str) -> str | None:
    """"yes" or "no" by the first word; None for anything else."""
    words = normalize_answer(prediction).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def vqa_accuracy(questions: Sequence[Question], predictions: Sequence[str]) -> dict[str, float]:
    """``vqa_acc`` overall and ``vqa_acc_<type>`` per question type (no keys without questions)."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for question, prediction in zip(questions, predictions):
        by_type[question.type].append(answer_matches(prediction, question.answer))
    if not by_type:
        return {}
    everything = [hit for hits in by_type.values() for hit in hits]
    metrics = _share("vqa_acc", everything)
    for kind, hits in sorted(by_type.items()):
        metrics.update({**_share(f"vqa_acc_{kind}", hits), f"n_vqa_{kind}": float(len(hits))})
    return metrics


def _share(name: str, hits: Sequence[bool]) -> dict[str, float]:
    """A share of items and its standard error."""
    return {name: _mean(hits), f"{name}_se": standard_errors.of_proportion(hits)}


def pope_metrics(predicted: Sequence[str | None], truth: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision/recall/F1 with "yes" as the positive class, and the share of "yes" answers.

    ``predicted`` holds "yes", "no" or None (an answer that is neither, always wrong).
    """
    if not truth:
        return {}
    precision, recall, f1 = _pope_f1(predicted, truth)
    pick = lambda items, rows: [items[i] for i in rows]  # noqa: E731
    return {
        **_share("pope_acc", [p == t for p, t in zip(predicted, truth)]),
        "pope_precision": precision,
        "pope_precision_se": standard_errors.of_proportion([t == "yes" for p, t in zip(predicted, truth) if p == "yes"]),
        "pope_recall": recall,
        "pope_recall_se": standard_errors.of_proportion([p == "yes" for p, t in zip(predicted, truth) if t == "yes"]),
        "pope_f1": f1,
        "pope_f1_se": standard_errors.bootstrap(
            len(truth), lambda rows: _pope_f1(pick(predicted, rows), pick(truth, rows))[2], len(truth)
        ),
        **_share("pope_yes_ratio", [p == "yes" for p in predicted]),
    }


def _pope_f1(predicted: Sequence[str | None], truth: Sequence[str]) -> tuple[float, float, float]:
    """Precision, recall and F1 with "yes" as the positive class (0 where a denominator is 0)."""
    true_pos = sum(p == "yes" and t == "yes" for p, t in zip(predicted, truth))
    said_yes = sum(p == "yes" for p in predicted)
    positives = sum(t == "yes" for t in truth)
    precision = true_pos / said_yes if said_yes else 0.0
    recall = true_pos / positives if positives else 0.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# Longest paraphrase first, so "t-shirt" wins over "shirt" and "pair of trousers" over any shorter word.
_GARMENT_PATTERNS = sorted(
    ((normalize_answer(phrase), cls) for cls, phrases in GARMENT_WORDS.items() for phrase in phrases),
    key=lambda pair: -len(pair[0]),
)


def garment_named(caption: str) -> str | None:
    """The Fashion-MNIST class whose paraphrase the caption contains as whole words (plural allowed);
    the longest matching paraphrase decides; None when it names none."""
    text = normalize_answer(caption)
    for phrase, cls in _GARMENT_PATTERNS:
        if re.search(rf"\b{re.escape(phrase)}(?:e?s)?\b", text):
            return cls
    return None


def garment_accuracy(images: Sequence[EvalImage], captions: Sequence[str]) -> dict[str, float]:
    hits = [garment_named(c) == image.attrs.get("class_name") for image, c in zip(images, captions)
            if image.source == "fashion_mnist"]
    return {**_share("garment_acc", hits), "n_garment": float(len(hits))} if hits else {}


def _sanitize_caption(text: str) -> str:
    # The PTB tokenizer and METEOR read one sentence per line: any line break would shift every later
    # sentence onto the wrong image, and METEOR splits on "|||".
    return " ".join(text.replace("|||", " ").split())


class CaptionScorer:
    """COCO caption metrics on PTB-tokenized text. METEOR runs in one JVM that loads its paraphrase table
    in the background as soon as the scorer exists; use it as a context manager so the JVM is closed."""

    def __init__(self, metrics: Sequence[str] = CAPTION_METRICS):
        unknown = set(metrics) - set(CAPTION_METRICS)
        if unknown:
            raise ValueError(f"unknown caption metrics {sorted(unknown)}; known: {CAPTION_METRICS}")
        self.metrics = tuple(metrics)
        self._meteor = None
        if "meteor" in self.metrics:
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._meteor is not None:
            process = self._meteor.meteor_p
            process.stdin.close()
            process.kill()
            process.wait()
            self._meteor = None

    def score(self, predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
        """Corpus scores of one prediction per id against that id's references."""
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        if not predictions:
            return {}
        refs, preds = self._tokenized(predictions, references)
        scores = {}
        if "bleu4" in self.metrics:  # a corpus score: its standard error by resampling the images
            keys = list(preds)
            scores["bleu4"] = _bleu4(refs, preds, keys, range(len(keys)))
            scores["bleu4_se"] = standard_errors.bootstrap(len(keys), lambda rows: _bleu4(refs, preds, keys, rows), 0)
        if "meteor" in self.metrics:  # a corpus score too; the spread of its per-image scores stands in for its error
            if self._meteor is None:
                raise RuntimeError("CaptionScorer is closed")
            scores["meteor"], per_image = self._meteor.compute_score(refs, preds)
            scores["meteor_se"] = standard_errors.of_mean(per_image)
        if "rouge_l" in self.metrics:  # ROUGE-L and CIDEr are means of per-image scores
            scores["rouge_l"], per_image = Rouge().compute_score(refs, preds)
            scores["rouge_l_se"] = standard_errors.of_mean(per_image)
        if "cider" in self.metrics:
            scores["cider"], per_image = Cider().compute_score(refs, preds)
            scores["cider_se"] = standard_errors.of_mean(per_image)
        return {name: float(value) for name, value in scores.items()}

    @staticmethod
    def _tokenized(predictions: dict[str, str], references: dict[str, list[str]]) -> tuple[dict, dict]:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        # One PTB run (one JVM start) for references and predictions together, told apart by key.
        raw = {f"ref:{key}": [{"caption": _sanitize_caption(c)} for c in references[key]] for key in predictions}
        raw.update({f"pred:{key}": [{"caption": _sanitize_caption(text)}] for key, text in predictions.items()})
        tokens = PTBTokenizer().tokenize(raw)
        refs = {key: tokens[f"ref:{key}"] for key in predictions}
        return refs, {key: tokens[f"pred:{key}"] for key in predictions}


def _bleu4(refs: dict, preds: dict, keys: list[str], rows) -> float:
    """Corpus BLEU-4 of the images ``keys[rows]`` (an image drawn twice counts twice)."""
    from pycocoevalcap.bleu.bleu import Bleu

    drawn = [keys[row] for row in rows]
    return Bleu(4).compute_score({i: refs[k] for i, k in enumerate(drawn)}, {i: preds[k] for i, k in enumerate(drawn)},
                                 verbose=0)[0][3]


def _mean(values: Sequence[bool | float]) -> float:
    return float(sum(values) / len(values))


# ---------------------------------------------------------------- running the model


def answer_budget(cfg: EvaluateConfig) -> int:
    """New tokens for a short answer: a quarter of the caption budget."""
    return max(1, cfg.max_new_tokens // 4)


def generate_all(
    model: MLLM, vectors: torch.Tensor, questions: Sequence[str | None], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy generations for (embedding, question) pairs, ``batch_size`` prompts at a time."""
    outputs: list[str] = []
    for start in range(0, len(questions), batch_size):
        end = start + batch_size
        outputs += model.generate(vectors[start:end], list(questions[start:end]), max_new_tokens)
    return outputs


def caption_nlls(
    model: MLLM, vectors: torch.Tensor, captions: Sequence[str], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of each caption (answer tokens, end-of-turn marker included) after the caption prompt,
    teacher-forced on its own embedding, and its token count."""
    sums, counts = [], []
    for start in range(0, len(captions), batch_size):
        conversations = [model.conversation(None, caption) for caption in captions[start : start + batch_size]]
        batch_sums, batch_counts, _ = model.answer_scores(vectors[start : start + batch_size], conversations)
        sums.append(batch_sums)
        counts.append(batch_counts)
    return torch.cat(sums), torch.cat(counts)


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation that moves every index (identity for n < 2): each caption gets another image."""
    order = list(range(n))
    random.Random(f"{seed}-shuffle").shuffle(order)
    partner = {order[i]: order[(i + 1) % n] for i in range(n)}
    return [partner[i] for i in range(n)]


# ---------------------------------------------------------------- ranked probes


def swapped_captions(caption: str, value: str, phrases: dict[str, list[str]]) -> list[str] | None:
    """``caption`` with the phrase naming ``value`` replaced by the first phrase of each value (in the order of
    ``phrases``): candidates that differ in that attribute alone. None when no phrase of ``value`` is in it."""
    for phrase in sorted(phrases.get(value, []), key=len, reverse=True):
        found = re.search(rf"\b{re.escape(phrase)}\b", caption, flags=re.IGNORECASE)
        if found:
            head, tail = caption[: found.start()], caption[found.end() :]
            capital = found.group(0)[0].isupper()
            return [_fix_articles(head + _capitalized(words[0], capital) + tail) for words in phrases.values()]
    return None


def _capitalized(text: str, capital: bool) -> str:
    return text[0].upper() + text[1:] if capital else text


def _fix_articles(text: str) -> str:
    """"a"/"an" chosen by the next word's first letter ("an red" -> "a red", "a orange" -> "an orange")."""
    return re.sub(r"\b([Aa])n? (?=(\w))", lambda m: m.group(1) + ("n " if m.group(2) in "aeiouAEIOU" else " "), text)


@dataclass(frozen=True)
class RankedPair:
    image: int  # index into the eval images
    truth: str
    other: str
    captions: tuple[str, str]  # the reference caption naming the true value, the same naming the other


def ranked_pairs(images: Sequence[EvalImage], probe: str, seed: int) -> list[RankedPair]:
    """The two-way choices of one ranked probe: each eligible image against one seeded other value."""
    source, attribute, phrases = RANKED_PROBES[probe]
    values = list(phrases)
    rng = random.Random(f"{seed}-rank-{probe}")
    pairs = []
    for index, image in enumerate(images):
        truth = image.attrs.get(attribute)
        candidates = swapped_captions(image.captions[0], truth, phrases) if image.source == source else None
        if candidates is None:
            continue  # another source, or a caption that does not name the attribute (counted in n_rank_*)
        other = rng.choice([v for v in values if v != truth])
        pairs.append(RankedPair(index, truth, other, (candidates[values.index(truth)], candidates[values.index(other)])))
    return pairs


def ranked_probe(
    model: MLLM, eval_set: EvalSet, probe: str, batch_size: int, seed: int = 0
) -> tuple[dict[str, float], dict[int, str]]:
    """Two-way choice per eligible image: its reference caption with the true value against the same caption
    with one seeded other value (chance 0.5; two candidates over many images say more, for the same compute,
    than all values over few). Returns the share where the true one has the lower summed NLL given the
    image, its mean NLL margin, and the value picked per image index."""
    pairs = ranked_pairs(eval_set.images, probe, seed)
    metrics = {f"n_rank_{probe}": float(len(pairs))}
    if not pairs:
        return metrics, {}
    vectors = eval_set.vectors[[pair.image for pair in pairs for _ in range(2)]]
    sums, _ = caption_nlls(model, vectors, [caption for pair in pairs for caption in pair.captions], batch_size)
    margins = (sums[1::2] - sums[0::2]).tolist()  # other minus true: positive when the truth is preferred
    picked = {pair.image: pair.truth if margin > 0 else pair.other for pair, margin in zip(pairs, margins)}
    metrics.update(_share(f"rank_{probe}_acc", [margin > 0 for margin in margins]))
    metrics[f"rank_{probe}_margin"] = _mean(margins)
    metrics[f"rank_{probe}_margin_se"] = standard_errors.of_mean(margins)
    return metrics, picked


def evaluate_model(
    model: MLLM, eval_set: EvalSet, cfg: EvaluateConfig, scorer: CaptionScorer
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, one prediction row per caption, question and probe) of one checkpoint."""
    model.eval()
    model.config.max_length = None  # score whole references, whatever budget training used
    images, vectors, questions = eval_set.images, eval_set.vectors, eval_set.questions
    captions = generate_all(model, vectors, [None] * len(images), cfg.max_new_tokens, cfg.batch_size)
    question_vectors = vectors[[q.image for q in questions]] if questions else vectors[:0]
    answers = generate_all(model, question_vectors, [q.text for q in questions], answer_budget(cfg), cfg.batch_size)
    vqa = [(q, a) for q, a in zip(questions, answers) if q.kind == "vqa"]
    pope = [(q, a) for q, a in zip(questions, answers) if q.kind == "pope"]
    metrics = {
        **scorer.score({im.id: c for im, c in zip(images, captions)}, {im.id: im.captions for im in images}),
        **grounding(model, eval_set, cfg),
        **vqa_accuracy([q for q, _ in vqa], [a for _, a in vqa]),
        **pope_metrics([yes_no(a) for _, a in pope], [q.answer for q, _ in pope]),
        **garment_accuracy(images, captions),
        "n_images": float(len(images)),
        "n_vqa": float(len(vqa)),
        "n_pope": float(len(pope)),
    }
    picks = {}
    for probe in RANKED_PROBES:
        probe_metrics, picks[probe] = ranked_probe(model, eval_set, probe, cfg.batch_size, cfg.seed)
        metrics.update(probe_metrics)
    rows = caption_rows(images, captions, model.config.caption_prompt, picks)
    return metrics, rows + question_rows(images, questions, answers)


def grounding(model: MLLM, eval_set: EvalSet, cfg: EvaluateConfig) -> dict[str, float]:
    """Reference-caption NLL given the true image and given another image, and the gap between them."""
    references = [image.captions[0] for image in eval_set.images]
    matched, counts = caption_nlls(model, eval_set.vectors, references, cfg.batch_size)
    others = eval_set.vectors[derangement(len(references), cfg.seed)]
    shuffled, _ = caption_nlls(model, others, references, cfg.batch_size)
    tokens = float(counts.sum())
    nll, nll_shuffled = float(matched.sum()) / tokens, float(shuffled.sum()) / tokens
    return {  # per-token means over captions of different lengths: the standard error of a ratio of sums
        "caption_nll": nll, "caption_nll_se": standard_errors.of_ratio(matched, counts),
        "caption_nll_shuffled": nll_shuffled, "caption_nll_shuffled_se": standard_errors.of_ratio(shuffled, counts),
        "image_gain": nll_shuffled - nll, "image_gain_se": standard_errors.of_ratio(shuffled - matched, counts),
    }


def caption_rows(
    images: Sequence[EvalImage], captions: Sequence[str], prompt: str, picks: dict[str, dict[int, str]]
) -> list[dict]:
    rows = []
    for index, (image, caption) in enumerate(zip(images, captions)):
        row = {"id": image.id, "kind": "caption", "prompt": prompt, "prediction": caption,
               "references": image.captions, "correct": None}
        row.update({f"ranked_{probe}": chosen[index] for probe, chosen in picks.items() if index in chosen})
        if image.source == "fashion_mnist":
            named = garment_named(caption)
            row.update(garment=named, correct=named == image.attrs.get("class_name"))
        rows.append(row)
    return rows


def question_rows(images: Sequence[EvalImage], questions: Sequence[Question], answers: Sequence[str]) -> list[dict]:
    rows = []
    for question, answer in zip(questions, answers):
        rows.append({
            "id": images[question.image].id, "kind": question.kind, "type": question.type, "prompt": question.text,
            "prediction": answer, "reference": question.answer, "correct": is_correct(question, answer),
        })
    return rows


def is_correct(question: Question, answer: str) -> bool:
    if question.kind == "pope":
        return yes_no(answer) == question.answer
    return answer_matches(answer, question.answer)
