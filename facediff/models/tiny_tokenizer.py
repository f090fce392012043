"""A tiny CLIP tokenizer built in memory, offline and deterministically, for the tiny Stable Diffusion preset.

The real CLIP tokenizer (49,408 tokens) must be downloaded; tests and the demo cannot. This one has CLIP's exact
algorithm (transformers' `CLIPTokenizer`: lower-casing, CLIP's pre-tokeniser, byte-level BPE with the "</w>"
end-of-word suffix) and CLIP's vocabulary layout (256 byte symbols, the same with "</w>", merges, then
`<|startoftext|>` and `<|endoftext|>` last), but its merges are learned from the attribute prompts' words only,
so every word of `facediff.data.prompts.prompt_words()` is one token and any other text still tokenises, one
byte symbol per character. A small vocabulary keeps the tiny text encoder's embedding table small.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import cache

from transformers import CLIPTokenizer

from facediff.data.prompts import prompt_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
MODEL_MAX_LENGTH = 77  # CLIP's context length; SD's text encoders have 77 position embeddings


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character table: byte-level BPE works on these characters so that every
    byte has a visible symbol (printable ASCII and Latin-1 map to themselves, the rest to chr(256 + n))."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _symbols(word: str) -> tuple[str, ...]:
    chars = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + SUFFIX)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE training until every word is one symbol: each step merges the most frequent adjacent pair (ties: the
    lexicographically smallest, for determinism). Applying these merges in rank order, as BPE encoding does,
    reproduces the training segmentation, so each word encodes to exactly one token."""
    corpus = [list(_symbols(w)) for w in sorted(set(words)) if w]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for word in corpus for pair in zip(word, word[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word in corpus:
            i = 0
            while i < len(word) - 1:
                if (word[i], word[i + 1]) == best:
                    word[i:i + 2] = [word[i] + word[i + 1]]
                i += 1


def tiny_vocab(words: Iterable[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the tiny tokenizer over `words` (default: `prompt_words()`)."""
    merges = learn_merges(prompt_words() if words is None else words)
    tokens = list(bytes_to_unicode().values())
    tokens += [t + SUFFIX for t in tokens]
    tokens += [a + b for a, b in merges]
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:  # a merge result can equal a base symbol only in odd corpora; keep the first id
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def tiny_clip_tokenizer(words: Iterable[str] | None = None) -> CLIPTokenizer:
    """A `CLIPTokenizer` whose merges make each of `words` (default: the attribute prompts' words) one token."""
    vocab, merges = tiny_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
                         model_max_length=MODEL_MAX_LENGTH)


def tiny_vocab_size(words: Iterable[str] | None = None) -> int:
    return len(tiny_vocab(words)[0])
