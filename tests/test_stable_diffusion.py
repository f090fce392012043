"""Stable Diffusion components: pipeline presets, the tiny backbone, its tokenizer and the attribute prompts."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from facediff.data.celebamask import ATTRIBUTE_NAMES
from facediff.data.prompts import attribute_prompt, attribute_prompts, prompt_words
from facediff.models.pretrained import WeightsNotFound
from facediff.models.stable_diffusion import StableDiffusionBackbone
from facediff.models.tiny_tokenizer import tiny_clip_tokenizer

PROMPT_1 = ("A photo of a person with arched eyebrows, attractive, brown hair, heavy makeup, high cheekbones, "
            "mouth slightly open, no beard, oval face, smiling, wearing lipstick, young")
PROMPT_2 = "A photo of a person with 5 o clock shadow, arched eyebrows, male, no beard, pale skin, young"
ATTRS_1 = ["Arched_Eyebrows", "Attractive", "Brown_Hair", "Heavy_Makeup", "High_Cheekbones", "Mouth_Slightly_Open",
           "No_Beard", "Oval_Face", "Smiling", "Wearing_Lipstick", "Young"]
ATTRS_2 = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Male", "No_Beard", "Pale_Skin", "Young"]
# Published parameter counts (unet, vae, text_encoder).
SD2 = (865_910_724, 83_653_863, 340_387_840)
PUBLISHED = {"sd2_base": SD2, "sd2_768": SD2, "sd15": (859_520_964, 83_653_863, 123_060_480)}


def ref(preset="tiny_sd", pretrained=None):
    return SimpleNamespace(preset=preset, pretrained=pretrained, subfolder=None, revision=None)


def vector(names):
    return [1.0 if name in names else 0.0 for name in ATTRIBUTE_NAMES]


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny():
    return StableDiffusionBackbone(ref(), load_weights=False)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory, tiny):
    """The tiny pipeline saved with a perturbed weight and a v-prediction scheduler (the preset says epsilon)."""
    folder = tmp_path_factory.mktemp("pipeline")
    backbone = StableDiffusionBackbone(ref(), load_weights=False)
    with torch.no_grad():
        backbone.unet.conv_in.bias.fill_(0.25)
    backbone.noise_scheduler = type(tiny.noise_scheduler).from_config(tiny.noise_scheduler.config,
                                                                      prediction_type="v_prediction")
    backbone.save_pipeline(folder)
    return folder


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_full_presets_match_published_parameter_counts_on_meta(preset):
    with torch.device("meta"):
        backbone = StableDiffusionBackbone(ref(preset), load_weights=False)
    assert (count(backbone.unet), count(backbone.vae), count(backbone.text_encoder)) == PUBLISHED[preset]
    assert backbone.unet.device.type == "meta"
    assert backbone.prediction_type == ("v_prediction" if preset == "sd2_768" else "epsilon")
    assert backbone.latent_shape(512) == (4, 64, 64)
    assert len(backbone.tokenizer) == 49408  # CLIP's own, offline (tests/test_clip_tokenizer.py)


def test_tiny_backbone_round_trips_shapes(tiny):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = tiny.encode_images(images)
    assert latents.shape == (2, *tiny.latent_shape(32)) == (2, 4, 8, 8)
    assert torch.equal(latents, tiny.encode_images(images))  # posterior mean: deterministic
    sampled = tiny.encode_images(images, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, latents)
    decoded = tiny.decode_latents(latents)
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= -1 and decoded.max() <= 1
    with pytest.raises(ValueError, match="divisible"):
        tiny.latent_shape(30)


def test_encode_prompts_shape_and_cache(tiny):
    calls = []
    hook = tiny.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        tiny.freeze()
        tiny.clear_prompt_cache()
        first = tiny.encode_prompts([PROMPT_1, PROMPT_2, PROMPT_1])
        assert first.shape == (3, 77, 32) and calls == [2]  # the repeated prompt is encoded once
        again = tiny.encode_prompts([PROMPT_2, PROMPT_1])
        assert calls == [2]  # served from the cache
        assert torch.equal(again, first[[1, 0]])
        assert not torch.equal(first[0], first[1])
    finally:
        hook.remove()


def test_two_builds_are_identical_and_leave_the_rng_alone(tiny):
    state = torch.random.get_rng_state()
    other = StableDiffusionBackbone(ref(), load_weights=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    a, b = tiny.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_pretrained_names_the_places_looked(tmp_path, monkeypatch):
    import huggingface_hub

    # The hub client reads HF_HUB_OFFLINE once at import; set both so the lookup fails fast, without a network try.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    missing = tmp_path / "no-such-pipeline"
    with pytest.raises(WeightsNotFound, match=re.escape(f"local folder {missing} (missing)")) as err:
        StableDiffusionBackbone(ref(pretrained=str(missing)), load_weights=True)
    assert f"hub id {str(missing)!r}" in str(err.value)
    with pytest.raises(WeightsNotFound, match="hub id 'facediff-test/none'.*Hugging Face cache") as err:
        StableDiffusionBackbone(ref(pretrained="facediff-test/none"), load_weights=True)
    assert "cannot load its vae" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)  # the first component


def test_pretrained_pipeline_is_loaded_with_its_own_prediction_type(saved_pipeline):
    loaded = StableDiffusionBackbone(ref(pretrained=str(saved_pipeline)), load_weights=True)
    assert loaded.prediction_type == "v_prediction"  # from the folder's scheduler, not the preset's epsilon
    assert torch.all(loaded.unet.conv_in.bias == 0.25)  # weights read, not a random init
    assert loaded.encode_prompts([PROMPT_2]).shape == (1, 77, 32)
    with pytest.raises(ValueError, match="does not fit preset"):
        StableDiffusionBackbone(ref("sd15", str(saved_pipeline)), load_weights=True)


def test_saved_pipeline_generates_in_plain_diffusers(saved_pipeline):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(saved_pipeline))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT_1, height=32, width=32, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    assert 0 <= out.min() and out.max() <= 1 and out.std() > 0


def test_attribute_prompts_match_the_papers():
    assert attribute_prompt(vector(ATTRS_1)) == PROMPT_1
    assert attribute_prompt([int(v) for v in vector(ATTRS_2)]) == PROMPT_2
    batch = torch.tensor([vector(ATTRS_2), vector([])])
    assert attribute_prompts(batch) == [PROMPT_2, "A photo of a person"]
    assert attribute_prompt(vector(["Bald"]), template="{attributes}, portrait") == "bald, portrait"
    with pytest.raises(ValueError, match="40"):
        attribute_prompt([1.0] * 39)


def test_tiny_tokenizer_one_token_per_word(tmp_path):
    tokenizer = tiny_clip_tokenizer()
    for word in prompt_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer(PROMPT_1).input_ids
    pieces = PROMPT_1.replace(",", " ,").split()
    assert len(ids) == len(pieces) + 2 <= tokenizer.model_max_length == 77
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == PROMPT_1.lower()
    assert len(tokenizer("zebra").input_ids) == 2 + 5  # unknown words still tokenise, per character
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
    assert reloaded([PROMPT_1, "zebra"], **kwargs).input_ids == tokenizer([PROMPT_1, "zebra"], **kwargs).input_ids


def test_tiny_preset_matches_the_tokenizer():
    from facediff.models.pretrained import preset_config

    text = preset_config("tiny_sd")["text_encoder"]
    tokenizer = tiny_clip_tokenizer()
    assert text["vocab_size"] == len(tokenizer)
    assert (text["bos_token_id"], text["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert preset_config("tiny_sd")["tokenizer"] == "tiny"
