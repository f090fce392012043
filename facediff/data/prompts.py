"""Text prompts from CelebA attribute vectors, worded as the paper's Stable Diffusion prompts.

The paper prompts SD with the face's positive attributes in header order, e.g. "A photo of a person with arched
eyebrows, attractive, brown hair, heavy makeup, high cheekbones, mouth slightly open, no beard, oval face,
smiling, wearing lipstick, young". Each phrase is the attribute name lower-cased with underscores as spaces;
the table is written out (not computed) so that a reworded phrase is a visible, reviewed change.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np
import torch

from facediff.data.celebamask import ATTRIBUTE_NAMES
from facediff.data.hashing import splitmix64

PROMPT_DROP_SALT = 0x70726F6D7074  # "prompt": prompt dropout's hashes differ from the flips' for the same seed

ATTRIBUTE_PHRASES: dict[str, str] = {
    "5_o_Clock_Shadow": "5 o clock shadow",
    "Arched_Eyebrows": "arched eyebrows",
    "Attractive": "attractive",
    "Bags_Under_Eyes": "bags under eyes",
    "Bald": "bald",
    "Bangs": "bangs",
    "Big_Lips": "big lips",
    "Big_Nose": "big nose",
    "Black_Hair": "black hair",
    "Blond_Hair": "blond hair",
    "Blurry": "blurry",
    "Brown_Hair": "brown hair",
    "Bushy_Eyebrows": "bushy eyebrows",
    "Chubby": "chubby",
    "Double_Chin": "double chin",
    "Eyeglasses": "eyeglasses",
    "Goatee": "goatee",
    "Gray_Hair": "gray hair",
    "Heavy_Makeup": "heavy makeup",
    "High_Cheekbones": "high cheekbones",
    "Male": "male",
    "Mouth_Slightly_Open": "mouth slightly open",
    "Mustache": "mustache",
    "Narrow_Eyes": "narrow eyes",
    "No_Beard": "no beard",
    "Oval_Face": "oval face",
    "Pale_Skin": "pale skin",
    "Pointy_Nose": "pointy nose",
    "Receding_Hairline": "receding hairline",
    "Rosy_Cheeks": "rosy cheeks",
    "Sideburns": "sideburns",
    "Smiling": "smiling",
    "Straight_Hair": "straight hair",
    "Wavy_Hair": "wavy hair",
    "Wearing_Earrings": "wearing earrings",
    "Wearing_Hat": "wearing hat",
    "Wearing_Lipstick": "wearing lipstick",
    "Wearing_Necklace": "wearing necklace",
    "Wearing_Necktie": "wearing necktie",
    "Young": "young",
}
assert tuple(ATTRIBUTE_PHRASES) == ATTRIBUTE_NAMES, "ATTRIBUTE_PHRASES must follow the header order"

DEFAULT_TEMPLATE = "A photo of a person with {attributes}"
DEFAULT_PLACEHOLDER = "A photo of a person"  # the prompt of a face with no positive attribute
SEPARATOR = ", "

# The pieces CLIP's pre-tokeniser splits text into: letter runs, single digits, other non-space runs.
_PIECES = re.compile(r"[^\W\d_]+|\d|(?:[^\w\s]|_)+")


def attribute_prompt(attributes: Sequence[float] | torch.Tensor, template: str = DEFAULT_TEMPLATE,
                     placeholder: str = DEFAULT_PLACEHOLDER) -> str:
    """The prompt of one 40-vector of 0/1 attributes (floats, ints or bools; anything > 0.5 is positive)."""
    values = [float(v) for v in (attributes.tolist() if isinstance(attributes, torch.Tensor) else attributes)]
    if len(values) != len(ATTRIBUTE_NAMES):
        raise ValueError(f"expected {len(ATTRIBUTE_NAMES)} attributes, got {len(values)}")
    positive = [ATTRIBUTE_PHRASES[name] for name, v in zip(ATTRIBUTE_NAMES, values) if v > 0.5]
    if not positive:
        return placeholder
    return template.format(attributes=SEPARATOR.join(positive))


def attribute_prompts(batch: torch.Tensor | Sequence[Sequence[float]], template: str = DEFAULT_TEMPLATE,
                      placeholder: str = DEFAULT_PLACEHOLDER) -> list[str]:
    """One prompt per row of a (B, 40) attribute batch."""
    return [attribute_prompt(row, template, placeholder) for row in batch]


def _literal_text(template: str) -> str:
    """The template without its `{...}` fields."""
    return " ".join(literal for literal, *_ in string.Formatter().parse(template))


def prompt_words(template: str = DEFAULT_TEMPLATE, placeholder: str = DEFAULT_PLACEHOLDER) -> list[str]:
    """Sorted lower-case pieces (words, digits, punctuation such as ",") of every prompt the template can make:
    the vocabulary the tiny tokenizer turns into single tokens."""
    texts = [_literal_text(template), placeholder, SEPARATOR, *ATTRIBUTE_PHRASES.values()]
    return sorted({piece for text in texts for piece in _PIECES.findall(text.lower())})


def drop_prompts(prompts: list[str], p: float, seed: int, ids=None, epochs=None) -> list[str]:
    """Each prompt replaced by "" (classifier-free guidance's null prompt) with probability `p`: a function of
    (seed, epoch, id) only, like the flips (`stream.dataset.flip_decisions`), decided on the host from the batch's host
    columns. Drawing it on the device generator cost a host sync per step (reading the draw back), and a hash
    needs no generator state to resume exactly. A batch made by hand without ids or epochs: positions, epoch 0."""
    if p <= 0:
        return list(prompts)
    ids = np.arange(len(prompts)) if ids is None else ids
    epochs = 0 if epochs is None else epochs
    key = splitmix64(splitmix64(seed ^ PROMPT_DROP_SALT) ^ np.asarray(epochs, dtype=np.int64).astype(np.uint64))
    bits = splitmix64(key ^ np.asarray(ids, dtype=np.int64).astype(np.uint64)) >> np.uint64(11)
    drop = bits.astype(np.float64) / 2.0**53 < p  # the top 53 bits as a uniform number in [0, 1)
    return ["" if d else prompt for prompt, d in zip(prompts, drop.tolist())]
