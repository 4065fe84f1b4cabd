"""Compositional captions and questions generated from image attributes.

Captions vary in template and wording (several paraphrases per attribute), never one fixed string per
class, so the text corpus has many distinct strings and a model cannot learn a lookup table.
"""

from __future__ import annotations

import random
import re

from revision.sources import FASHION_MNIST_CLASSES, Item

SHAPE_WORDS = {
    "circle": ["circle", "disc", "round shape", "dot"],
    "rectangle": ["rectangle", "box", "oblong", "rectangular shape"],
    "triangle": ["triangle", "three-sided shape", "triangular shape"],
}
COLOUR_WORDS = {"gray": ["gray", "grey"], "teal": ["teal", "blue-green"]}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "medium": ["medium-sized", "mid-sized"], "large": ["large", "big"]}
POSITION_PHRASES = {
    "center": ["in the center", "in the middle", "at the center of the image"],
    "top": ["at the top", "near the top edge"],
    "bottom": ["at the bottom", "near the bottom edge"],
    "left": ["on the left", "on the left side"],
    "right": ["on the right", "on the right side"],
}
SHAPE_TEMPLATES = [
    "A {size} {colour} {shape} {position}.",
    "There is a {size} {colour} {shape} {position}.",
    "A photo of a {colour} {shape}, {size}, {position}.",
    "An image showing a {size} {colour} {shape} {position} on a plain background.",
    "{position_cap}, a {size} {colour} {shape}.",
    "A {colour} {shape} {position}.",
    "A single {size} {shape}, coloured {colour}, {position}.",
    "The picture contains one {colour} {shape} {position}.",
]
GARMENT_WORDS = {
    "t-shirt": ["t-shirt", "tee", "short-sleeved top", "t-shirt top"],
    "trouser": ["pair of trousers", "pair of pants", "pair of slacks"],
    "pullover": ["pullover", "sweater", "jumper", "knit pullover"],
    "dress": ["dress", "frock", "one-piece dress"],
    "coat": ["coat", "jacket", "overcoat"],
    "sandal": ["sandal", "open shoe", "summer sandal"],
    "shirt": ["shirt", "button-up shirt", "long-sleeved shirt"],
    "sneaker": ["sneaker", "trainer", "running shoe"],
    "bag": ["bag", "handbag", "purse"],
    "ankle boot": ["ankle boot", "short boot", "bootie"],
}
TONE_WORDS = {
    "dark": ["dark", "dark grey", "black"], "mid-grey": ["grey", "mid-grey", "gray"], "light": ["light", "pale", "light grey", "white"],
}
EXTENT_PHRASES = {
    "small": ["small in the frame", "with empty space around it", "taking up little of the frame"],
    "medium": ["at a moderate size", "in the middle of the frame", "neither large nor small in the frame"],
    "large": ["filling the frame", "taking up most of the picture", "filling most of the image"],
}
TEXTURE_WORDS = {
    "plain": ["plain", "smooth", "solid-coloured"],
    "patterned": ["lightly patterned", "slightly textured", "subtly detailed"],
    "textured": ["textured", "patterned", "busy-patterned"],
}
# A garment caption is an opener and a body, so tone, texture and extent combine freely with the wording.
GARMENT_OPENERS = ["A", "A photo of a", "An image of a", "A picture of a", "Product shot: a", "A grayscale photo of a",
                   "Here is a", "This shows a"]
GARMENT_BODIES = [
    "{texture} {tone} {garment}, {extent}.",
    "{tone} {garment} with a {texture} look, {extent}.",
    "{texture} {garment} in {tone}.",
    "{tone} {garment}, {extent}.",
    "{garment} {extent}; it looks {texture}.",
    "{tone}, {texture} {garment}.",
    "{garment} in {tone} tones on a black background.",
]
CAPTION_PROMPTS = [
    "Describe the image briefly.",
    "What is in this picture?",
    "Write a short caption for this image.",
    "What do you see?",
]
TEXT_ONLY_PROMPTS = [  # VoRA's text-only stage-1 samples: no image to describe, so the request names none
    "Write a short caption for a picture.",
    "Describe a simple picture in one sentence.",
    "Give an example of an image caption.",
]
GARMENT_QUESTION = "What kind of clothing item is this?"


def _pick(words: dict[str, list[str]], key: str, rng: random.Random) -> str:
    return rng.choice(words.get(key, [key]))


def _position_phrase(position: str, rng: random.Random) -> str:
    if position in POSITION_PHRASES:
        return rng.choice(POSITION_PHRASES[position])
    return rng.choice([f"in the {position} corner", f"toward the {position}", f"at the {position}"])


def caption(item: Item, rng: random.Random) -> str:
    """One caption for ``item``, its template and wording drawn from ``rng``."""
    return _articles(_raw_caption(item, rng))


def _articles(text: str) -> str:
    """"a" before a vowel becomes "an" ("a orange disc" -> "an orange disc")."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def _raw_caption(item: Item, rng: random.Random) -> str:
    a = item.attrs
    if item.source == "easyvqa":
        position = _position_phrase(a["position"], rng)
        return rng.choice(SHAPE_TEMPLATES).format(
            size=_pick(SIZE_WORDS, a["size"], rng),
            colour=_pick(COLOUR_WORDS, a["colour"], rng),
            shape=_pick(SHAPE_WORDS, a["shape"], rng),
            position=position,
            position_cap=position[0].upper() + position[1:],
        )
    return (rng.choice(GARMENT_OPENERS) + " " + rng.choice(GARMENT_BODIES)).format(
        tone=_pick(TONE_WORDS, a["tone"], rng),
        garment=_pick(GARMENT_WORDS, a["class_name"], rng),
        extent=_pick(EXTENT_PHRASES, a.get("extent", "medium"), rng),
        texture=_pick(TEXTURE_WORDS, a.get("texture", "plain"), rng),
    )


def distinct_captions(item: Item, n: int, rng: random.Random, tries: int = 50) -> list[str]:
    """Up to ``n`` different captions (fewer only if the templates cannot make more)."""
    seen: dict[str, None] = {}
    for _ in range(n * tries):
        seen.setdefault(caption(item, rng), None)
        if len(seen) == n:
            break
    return list(seen)


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes_no"
    if answer in SHAPE_WORDS:
        return "shape"
    if answer in GARMENT_WORDS:
        return "garment"
    return "colour"


EXISTENCE_QUESTION = "Is there a {thing} in the image?"  # the POPE probe's wording too (revision.evaluate)


def existence_questions(item: Item, count: int, row: int, rng: random.Random) -> list[tuple[str, str]]:
    """``count`` POPE-style questions about the item's object (easy-VQA: its shape; Fashion-MNIST: its garment
    class), answered yes (the true one) and no (a seeded other one) in turn, yes first on even rows, so a
    split holds as many yes as no. No random draw at all when ``count`` is 0."""
    if item.source == "easyvqa":
        truth, choices = item.attrs["shape"], sorted(SHAPE_WORDS)
    else:
        truth, choices = item.attrs["class_name"], list(FASHION_MNIST_CLASSES)
    pairs = []
    for k in range(count):
        present = (row + k) % 2 == 0
        thing = truth if present else rng.choice([c for c in choices if c != truth])
        pairs.append((EXISTENCE_QUESTION.format(thing=thing), "yes" if present else "no"))
    return pairs


def questions(item: Item, rng: random.Random) -> list[dict[str, str]]:
    """Question/answer pairs: easy-VQA's own questions, or generated ones for Fashion-MNIST."""
    if item.source == "easyvqa":
        pairs = item.questions
    else:
        cls = item.attrs["class_name"]
        other = rng.choice([c for c in FASHION_MNIST_CLASSES if c != cls])
        asked = rng.choice([cls, other])
        pairs = [
            (GARMENT_QUESTION, cls),
            (f"Is this a {asked}?", "yes" if asked == cls else "no"),
        ]
    return [{"question": q, "answer": a, "type": question_type(a)} for q, a in pairs]
