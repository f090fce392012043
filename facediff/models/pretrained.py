"""Networks named by a `PretrainedRef`: an architecture that ships with facediff and/or pretrained weights.

A production config names both: `preset` (a JSON architecture config under `facediff/models/presets/`, so
`facediff info` and random-init builds work offline) and `pretrained` (a hub id or a local folder). Weights are
read only when a job asks for them (`load_weights=True`: training or sampling); then the loaded network must have
the preset's parameter shapes. Tiny presets have no `pretrained` and are always randomly initialised.

Works for diffusers models (`ModelMixin`) and transformers models (`PreTrainedModel`), which both offer
`from_pretrained`; building from a config differs between the two and is hidden here.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class WeightsNotFound(FileNotFoundError):
    """Pretrained weights could not be loaded; the message lists every place they were looked for."""


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@cache
def _read_preset(name: str) -> str:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown architecture preset {name!r} ({path} not found); available: {available_presets()}")
    return path.read_text()


def preset_config(name: str) -> dict[str, Any]:
    """The architecture config of a shipped preset (a fresh dict each call). `pipeline/component` names one
    network of a whole-pipeline preset, e.g. `sd2_base/vae` (so `prepare latents` can use an SD pipeline's VAE)."""
    pipeline, _, component = name.partition("/")
    config = json.loads(_read_preset(pipeline))
    config.pop("_comment", None)  # presets document their source in `_comment`
    if component:
        if not isinstance(config.get(component), dict):
            networks = [k for k, v in config.items() if isinstance(v, dict)]
            raise ValueError(f"preset {pipeline!r} has no network {component!r}; it has {networks}")
        config = config[component]
    return config


def from_config(cls: type[nn.Module], config: dict[str, Any]) -> nn.Module:
    """A randomly initialised `cls` from an architecture config dict (diffusers or transformers class)."""
    config_class = getattr(cls, "config_class", None)
    if config_class is not None and hasattr(config_class, "from_dict"):  # transformers
        return cls(config_class.from_dict(config))
    return cls.from_config(config)  # diffusers


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _describe_lookup(ref) -> str:
    name = ref.pretrained + (f" (subfolder {ref.subfolder})" if ref.subfolder else "")
    local = Path(ref.pretrained).expanduser()
    places = [f"local folder {local.resolve()} ({'exists' if local.exists() else 'missing'})"]
    if not local.exists():
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        places.append(f"hub id {ref.pretrained!r} in the Hugging Face cache {_hub_cache()}")
        places.append("the Hugging Face Hub (" + ("not tried: HF_HUB_OFFLINE is set" if offline else "download failed")
                      + ")")
    return f"weights {name}: looked at " + "; ".join(places)


def _check_fits_preset(cls, model: nn.Module, ref) -> None:
    with torch.device("meta"):
        expected = from_config(cls, preset_config(ref.preset))
    want = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ValueError(f"{ref.pretrained}: weights do not fit preset {ref.preset!r} (first differences: {diff})")


def build_from_ref(cls: type[nn.Module], ref, load_weights: bool) -> nn.Module:
    """The network `ref` names: pretrained weights when `load_weights` and `ref.pretrained` are set, else a random
    init of `ref.preset`'s architecture. Raises `WeightsNotFound` naming where the weights were looked for."""
    if load_weights and ref.pretrained:
        kwargs = {k: v for k, v in (("subfolder", ref.subfolder), ("revision", ref.revision)) if v}
        try:
            model = cls.from_pretrained(ref.pretrained, **kwargs)
        except (OSError, ValueError) as err:  # hub/HTTP errors subclass OSError; bad configs raise ValueError
            raise WeightsNotFound(f"{_describe_lookup(ref)}. {type(err).__name__}: {err}") from None
        if ref.preset:
            _check_fits_preset(cls, model, ref)
        return model
    if ref.preset is None:
        raise ValueError(f"{ref.pretrained}: no `preset` architecture given, so the network cannot be built without "
                         f"loading its weights; add one of {available_presets()}")
    return from_config(cls, preset_config(ref.preset))
