"""Tokenizers for tiny pipelines, built locally: no download, any English prompt.

* :func:`tiny_clip_tokenizer`: a CLIP byte-level BPE with the real vocabulary's layout (the 256
  byte characters, their end-of-word forms, a few merges, the start/end tokens last), so it
  encodes any UTF-8 text without an unknown token; 77 tokens, as every CLIP text encoder.
* :func:`tiny_t5_tokenizer`: a T5 Unigram vocabulary (``<pad>``, ``</s>``, ``<unk>`` first,
  then ASCII characters and a few whole words); 512 tokens.

Both survive ``save_pretrained`` / ``from_pretrained``, so a tiny pipeline saved in diffusers'
layout loads back through the real loaders. Used by :mod:`adapterswap.kit.tiny`; transformers
is imported inside the functions.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, T5TokenizerFast


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses to stand for the 256 byte values.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes (control
    characters, space, ...) follow in byte order, shifted to code points 256 and up. This is the
    layout of CLIP's and GPT-2's vocabularies, so the tiny vocabulary covers any UTF-8 text.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]


# A handful of merges so that common words become single tokens, as with the real vocabulary.
_CLIP_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "f</w>"),
    ("i", "n</w>"),
    ("o", "n</w>"),
    ("p", "h"),
    ("ph", "o"),
    ("pho", "t"),
    ("phot", "o</w>"),
)


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer with a ~530-token vocabulary, built locally.

    The vocabulary holds the 256 byte characters, their end-of-word (``</w>``) forms, a few merges
    and ``<|startoftext|>`` / ``<|endoftext|>`` last, laid out like the real CLIP vocabulary, so it
    tokenizes any prompt. ``model_max_length`` is 77, as for every diffusion model's CLIP.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(char + "</w>" for char in alphabet)]:
        vocab[token] = len(vocab)
    for left, right in _CLIP_MERGES:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(_CLIP_MERGES), model_max_length=77)


_T5_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "portrait", "man", "woman",
    "person", "face", "cat", "dog", "style", "painting", "wearing", "red", "blue", "light",
)  # fmt: skip


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer with a ~120-piece vocabulary, built locally.

    ``<pad>`` = 0, ``</s>`` = 1 and ``<unk>`` = 2 as in T5; then the metaspace ``▁``, every
    printable ASCII character and a few whole words. Words split on whitespace, ``</s>`` is
    appended, characters outside ASCII become ``<unk>``. ``model_max_length`` is 512 (the usual
    ``max_sequence_length`` limit). No sentinel ``<extra_id_*>`` tokens: text encoders of
    diffusion models never use them.
    """
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces.append(("\N{LOWER ONE EIGHTH BLOCK}", -6.0))  # "▁", SentencePiece's word marker
    pieces += [(char, -8.0) for char in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\N{LOWER ONE EIGHTH BLOCK}" + word, -4.0) for word in _T5_WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
