"""Generated tokenizer vocabularies for the tiny presets (no download)."""

from __future__ import annotations

import json
import string
from pathlib import Path

MEDICAL_WORDS = (
    "a an the with without no of in on and or showing image scan slice axial brain mri t1 weighted "
    "breast ultrasound mass tumour tumor lesion glioma meningioma pituitary cyst bright dark small medium "
    "large ring enhancing hypoechoic irregular smooth margins left right frontal parietal occipital lobe "
    "healthy normal tissue photo of chest x ray ct lung opacity benign malignant nodule background "
    "cat dog chair sitting table").split()


def write_bert_vocab(folder: Path) -> int:
    """WordPiece vocab: specials, characters, ##characters and a medical word list."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    tokens += [w for w in dict.fromkeys(MEDICAL_WORDS) if w not in tokens]
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


def write_clip_bpe(folder: Path) -> int:
    """Byte-level BPE vocab (no merges: every word splits into characters) for CLIPTokenizer."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)
