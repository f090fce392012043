"""The real CLIP tokenizer of the Stable Diffusion presets, built offline from the BPE file `open_clip_torch` ships.

SD 1.5 (OpenAI CLIP ViT-L/14) and SD 2 (OpenCLIP ViT-H/14) tokenize with the same 49,408-token byte-level BPE;
its merges ship inside the `open_clip_torch` wheel as `bpe_simple_vocab_16e6.txt.gz`. The vocabulary is derived
from them exactly as open_clip's `SimpleTokenizer` does (256 byte symbols, the same with "</w>", the first 48,894
merges joined, then the two special tokens), and handed to transformers' `CLIPTokenizer`, whose pre-tokenizer and
"</w>" BPE are CLIP's: so random-weight builds of the SD presets (`facediff train --dry-run --random-weights`,
`StableDiffusionBackbone(load_weights=False)`) tokenize prompts into the ids the pretrained pipeline would.
The two pipelines differ in padding only: SD 2's tokenizer pads with "!" (id 0, as OpenCLIP does), SD 1.5's with
`<|endoftext|>`. tests/test_clip_tokenizer.py compares the ids with open_clip's own tokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

from facediff.models.tiny_tokenizer import BOS, EOS, MODEL_MAX_LENGTH, SUFFIX

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the file's first 48,894 merges: 49,408 tokens with the specials
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
# the pad token of each shipped hub preset's published tokenizer (`tokenizer/special_tokens_map.json`)
PAD_TOKENS = {"sd15": EOS, "sd2_base": "!", "sd2_768": "!"}


def bpe_path() -> Path | None:
    """The BPE merges file inside the installed open_clip package (found without importing open_clip, whose
    import pulls in timm), or None when the package is absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    return path if path.is_file() else None


def byte_symbols() -> list[str]:
    """GPT-2's printable symbol of each byte in CLIP's vocabulary order: the printable bytes first (they stand for
    themselves: "!" is id 0), then the others as chr(256 + n). (`tiny_tokenizer.bytes_to_unicode` sorts by byte.)"""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@cache
def clip_vocab(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of CLIP's tokenizer from open_clip's BPE file (its first line is a version header)."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    tokens = byte_symbols()
    tokens += [t + SUFFIX for t in tokens]
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not CLIP's BPE file ({len(vocab)} distinct tokens, {VOCAB_SIZE} expected)")
    return vocab, merges


def offline_clip_tokenizer(preset: str) -> CLIPTokenizer | None:
    """The exact tokenizer of the hub preset `preset` (a key of PAD_TOKENS), or None when open_clip_torch is not
    installed or the preset's tokenizer is not CLIP's."""
    path = bpe_path()
    if path is None or preset not in PAD_TOKENS:
        return None
    vocab, merges = clip_vocab(path)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), bos_token=BOS, eos_token=EOS, unk_token=EOS,
                         pad_token=PAD_TOKENS[preset], model_max_length=MODEL_MAX_LENGTH)
