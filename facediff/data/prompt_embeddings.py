"""Cached text embeddings of a dataset's finite prompt set (`sd_lora`), so training never runs the text encoder.

An `sd_lora` record's prompt is a function of its 40 attributes (`data.prompts.attribute_prompt`), so a dataset
has a fixed, finite set of prompts: every record's, the placeholder prompt and "" (prompt dropout's and
guidance's null prompt). `write_prompt_embeddings` (`facediff prepare prompt-embeddings`, and `prepare latents
--config` of an sd_lora config) encodes each once with the pipeline's frozen text encoder into
`DATASET/prompt_embeddings.safetensors`: one (77, hidden) tensor per prompt, keyed by the SHA-256 of the prompt,
and records in the manifest's `prompt_embeddings` entry (and the file's metadata) the pipeline it came from and
the prompt wording. With `data.use_latents` a worker reads the rows it needs from that file (memory-mapped:
one copy in the page cache per node, whatever the number of workers) instead of encoding.

Why on disk, not the in-memory per-prompt cache (`StableDiffusionBackbone.encode_prompts`): CelebAMask-HQ's 27k
training faces have nearly as many distinct attribute vectors, so a 512-entry cache almost never hits during
training; and all of them together (SD2: 77 x 1024 fp16 = 158 kB each, ~4 GB) are too much to hold per worker.

COCO captions (controlnet) are not cached here: a record has ~5 captions, so the file would be ~5 x 158 kB per
image, larger than the image itself, and each caption is seen once an epoch at most; the text encoder is a
small part of a ControlNet step beside the UNet, the ControlNet and the perceptual losses.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from facediff.config.paths import resolve_reference
from facediff.data.prompts import attribute_prompts
from facediff.data.shards import MANIFEST, read_manifest, shard_paths, write_manifest

PROMPT_EMBEDDINGS = "prompt_embeddings.safetensors"
MANIFEST_KEY = "prompt_embeddings"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def cache_identity(model) -> dict[str, Any]:
    """What the embeddings depend on: the pipeline (text encoder and tokenizer) and the prompts' wording."""
    ref = model.pipeline
    return {"pipeline": {"preset": ref.preset, "pretrained": resolve_reference(ref.pretrained),
                         "subfolder": ref.subfolder, "revision": ref.revision},
            "conditional": model.conditional, "prompt_template": model.prompt_template,
            "placeholder_prompt": model.placeholder_prompt}


def dataset_prompts(dataset: str | Path, model) -> list[str]:
    """Every prompt training or guidance can ask for: "", the placeholder and (conditional) each record's."""
    prompts = {"", model.placeholder_prompt}
    if model.conditional:
        for split in read_manifest(dataset)["shards"]:
            for path in shard_paths(dataset, split):
                column = pq.read_table(path, columns=["attributes"])["attributes"]
                attributes = torch.tensor(column.to_pylist(), dtype=torch.float32).reshape(-1, 40)
                prompts.update(attribute_prompts(attributes, model.prompt_template, model.placeholder_prompt))
    return sorted(prompts)


def write_prompt_embeddings(dataset: str | Path, model, *, dtype: str = "float16", batch_size: int = 64,
                            use_gpu: bool = False) -> dict[str, Any]:
    """Encode the dataset's prompts with `model.pipeline`'s text encoder into DATASET/prompt_embeddings.safetensors
    and add its entry to the manifest (returned). dtype float16 (default; as the latents) or float32."""
    from safetensors.torch import save_file

    from facediff.models.stable_diffusion import StableDiffusionBackbone

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if getattr(model, "pipeline", None) is None or not hasattr(model, "prompt_template"):
        raise ValueError(f"model.family {model.family!r}: cached prompt embeddings are for sd_lora's attribute "
                         "prompts (COCO captions are not a fixed prompt set)")
    dataset = Path(dataset)
    manifest = read_manifest(dataset)
    prompts = dataset_prompts(dataset, model)
    backbone = StableDiffusionBackbone(model.pipeline, load_weights=True, components=("text_encoder",)).freeze()
    if use_gpu and torch.cuda.is_available():
        backbone.text_encoder.cuda()
    tensors = {}
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            states = backbone._encode_uncached(chunk).to("cpu", DTYPES[dtype])
            tensors.update({prompt_key(p): s.contiguous() for p, s in zip(chunk, states)})
    identity = cache_identity(model)
    tmp = dataset / f".{PROMPT_EMBEDDINGS}.tmp"
    save_file(tensors, str(tmp), metadata={"identity": json.dumps(identity, sort_keys=True)})
    os.replace(tmp, dataset / PROMPT_EMBEDDINGS)
    manifest[MANIFEST_KEY] = {"file": PROMPT_EMBEDDINGS, "prompts": len(prompts), "dtype": dtype,
                              "shape": list(next(iter(tensors.values())).shape), **identity}
    write_manifest(dataset, manifest)
    return manifest


def check_prompt_embeddings(dataset: str | Path, model) -> bool:
    """Whether the dataset holds prompt embeddings for `model` (False: none were written, prompts are encoded as
    before). Embeddings of another pipeline or wording are refused: they would condition on the wrong text."""
    info = read_manifest(dataset).get(MANIFEST_KEY)
    if info is None:
        return False
    where = Path(dataset) / info.get("file", PROMPT_EMBEDDINGS)
    if not where.is_file():
        raise ValueError(f"{where}: listed in {Path(dataset) / MANIFEST} but missing; run `facediff prepare "
                         f"prompt-embeddings {dataset} --config CONFIG` again")
    ours = cache_identity(model)
    for key, value in ours.items():
        cached = info.get(key)
        if key == "pipeline" and isinstance(cached, dict):
            cached = {**cached, "pretrained": resolve_reference(cached.get("pretrained"))}
        if cached != value:
            name = "model.pipeline" if key == "pipeline" else f"model.{key}"
            raise ValueError(f"{where}: the prompt embeddings were made for {name}={cached!r}, but the config has "
                             f"{value!r}; run `facediff prepare prompt-embeddings {dataset} --config CONFIG` with "
                             "this config (or set data.use_latents=false)")
    return True


class PromptEmbeddings:
    """Reads a dataset's cached prompt embeddings: `lookup(prompts) -> (B, 77, hidden)` on the CPU.

    The file is opened lazily and memory-mapped (safetensors' `safe_open`); the handle is not copied or pickled
    (an evaluation copy of the task opens its own)."""

    def __init__(self, dataset: str | Path):
        self.dataset = Path(dataset)
        self.path = self.dataset / PROMPT_EMBEDDINGS
        self._handle = None

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    def lookup(self, prompts: list[str]) -> torch.Tensor:
        from safetensors import safe_open

        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt")
        try:
            return torch.stack([self._handle.get_tensor(prompt_key(p)) for p in prompts])
        except Exception as err:  # safetensors raises its own error type for a missing key
            missing = next(p for p in prompts if prompt_key(p) not in set(self._handle.keys()))
            raise ValueError(f"{self.path}: no embedding of the prompt {missing!r} (the shards changed since it was "
                             f"written?); run `facediff prepare prompt-embeddings {self.dataset} --config CONFIG` "
                             "again") from err
