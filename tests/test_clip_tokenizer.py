"""The offline CLIP tokenizer of the SD presets (`facediff/models/clip_tokenizer.py`): the ids of open_clip's own
tokenizer, from the BPE file its wheel ships, with each pipeline's padding."""

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from facediff.models.clip_tokenizer import VOCAB_SIZE, offline_clip_tokenizer
from facediff.config.models import PretrainedRef
from facediff.models.stable_diffusion import StableDiffusionBackbone

PROMPTS = [
    "a photo of a smiling woman with blond hair, wearing eyeglasses",
    "A  man's face: 2 people in the 1990s-style café, naïve ART",
    "",
    "an extraordinarily photogenic person wearing heavy makeup and a necktie " * 6,  # cut at 77 tokens
]


@pytest.fixture(scope="module")
def reference():
    return SimpleTokenizer()


def ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def test_sd2_tokenizer_gives_open_clips_ids_padding_included(reference):
    tokenizer = offline_clip_tokenizer("sd2_base")
    assert len(tokenizer) == VOCAB_SIZE == 49408 and tokenizer.pad_token_id == 0  # "!", as OpenCLIP pads
    assert ids(tokenizer, PROMPTS).tolist() == reference(PROMPTS, context_length=77).tolist()


def test_sd15_tokenizer_pads_with_end_of_text(reference):
    tokenizer = offline_clip_tokenizer("sd15")
    got, want = ids(tokenizer, PROMPTS), reference(PROMPTS, context_length=77)
    eos = tokenizer.eos_token_id
    assert eos == 49407 and tokenizer.bos_token_id == 49406
    for row, ref in zip(got.tolist(), want.tolist()):
        length = ref.index(eos) + 1
        assert row[:length] == ref[:length] and set(row[length:]) <= {eos}


def test_random_backbone_of_a_hub_preset_tokenizes_offline():
    with torch.device("meta"):
        backbone = StableDiffusionBackbone(PretrainedRef(preset="sd2_base"), load_weights=False)
    assert backbone.tokenize(["a photo of a person"])[0, :6].tolist() == [49406, 320, 1125, 539, 320, 2533]
    assert offline_clip_tokenizer("tiny_sd") is None  # the tiny preset has its own tokenizer
