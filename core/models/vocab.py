"""Generated tokenizer vocabularies for the offline presets (no download).

Both writers can pad to a fixed vocabulary size, so a preset's embedding table has the real model's
shape (CLIP BPE 49,408; PubMedBERT WordPiece 30,522) while every word of the medical list stays one token.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable
from pathlib import Path

MEDICAL_WORDS = (
    "a an the with without no of in on and or showing image scan slice axial brain mri t1 weighted "
    "breast ultrasound mass tumour tumor lesion glioma meningioma pituitary cyst bright dark small medium "
    "large ring enhancing hypoechoic irregular smooth margins left right frontal parietal occipital lobe "
    "healthy normal tissue photo of chest x ray ct lung opacity benign malignant nodule background "
    "cat dog chair sitting table").split()


def write_bert_vocab(folder: Path, vocab_size: int | None = None) -> int:
    """WordPiece vocab: specials, characters, ##characters and a medical word list.

    ``vocab_size`` pads with ``[unused<i>]`` entries (as BERT's own vocab does) to that exact size.
    """
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    tokens += [w for w in dict.fromkeys(MEDICAL_WORDS) if w not in tokens]
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size {vocab_size} < {len(tokens)} base tokens")
        tokens += [f"[unused{i}]" for i in range(vocab_size - len(tokens))]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return len(tokens)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one lower-case letter run (last symbol carries ``</w>``)."""
    syms = list(word[:-1]) + [word[-1] + "</w>"]
    while len(syms) > 1:
        pairs = [(ranks.get((a, b), 1 << 62), i) for i, (a, b) in enumerate(zip(syms, syms[1:]))]
        rank, _ = min(pairs)
        if rank == 1 << 62:
            break
        a, b = next((syms[i], syms[i + 1]) for r, i in pairs if r == rank)
        out, i = [], 0
        while i < len(syms):
            if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(syms[i])
                i += 1
        syms = out
    return syms


def clip_word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) under which every letter run of ``words`` is a single token.

    Each word's merges are appended after the existing ones, so they never change how an earlier
    word encodes: the earlier word's own chain always holds a lower-ranked applicable merge.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    runs = dict.fromkeys(r for w in words for r in re.findall(r"[a-z]+", w.lower()) if len(r) > 1)
    for run in runs:
        syms = _bpe(run, ranks)
        while len(syms) > 1:
            pair = (syms[0], syms[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            syms = [syms[0] + syms[1]] + syms[2:]
    return merges


def write_clip_bpe(folder: Path, words: Iterable[str] = MEDICAL_WORDS, vocab_size: int | None = None) -> int:
    """Byte-level BPE vocab + merges for ``CLIPTokenizer``: each of ``words`` encodes to one token.

    ``vocab_size`` (e.g. 49,408 for CLIP ViT-L/14) appends two-symbol filler merges, ranked after the
    word merges, until the vocabulary has exactly that many entries.
    """
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = clip_word_merges(words)
    tokens += [a + b for a, b in merges]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    if vocab_size is not None:
        need = vocab_size - len(tokens) - len(specials)
        if need < 0:
            raise ValueError(f"vocab_size {vocab_size} < {len(tokens) + len(specials)} base tokens")
        known = set(tokens)
        fill = ((a, b) for a in chars for b in tokens[: 2 * len(chars)] if a + b not in known)
        extra = [next(fill) for _ in range(need)]
        merges += extra
        tokens += [a + b for a, b in extra]
    tokens += specials
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate BPE tokens")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(tokens)
