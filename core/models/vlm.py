"""Vision-language models (Qwen2-VL class) for VL-SAM saliency: a hub id, a local folder, or ``tiny``.

The ``tiny`` preset is a random-init ``Qwen2VLForConditionalGeneration`` (2 decoder layers, 4 query /
2 key-value heads, hidden 64; a 2-block vision tower with 4-px patches merged 2 x 2) with a word-level
tokenizer and a ``Qwen2VLProcessor`` built locally, so it loads through the same ``from_pretrained``
path as real weights. Images are resized to at most 64 x 64 px (8 x 8 = 64 image tokens). It says
nothing until trained: ``negdpo.segmentation.vlm_train`` teaches it to write phantom reports.
Loading never sets ``trust_remote_code``; weights are safetensors.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from .common import ModelNotAvailableError, build_once, hub_snapshot, seeded

QWEN2_VL = "Qwen/Qwen2-VL-2B-Instruct"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
UNK = "<unk>"
TINY_PIXELS = (32 * 32, 64 * 64)  # min / max pixels after the processor's resize
# Qwen2-VL's chat layout, reduced to what the saliency and the trainer use (string or image content parts).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REPORT_WORDS = (
    "user assistant system describe findings report where is are this what see do you any "
    "t1 weighted axial brain mri showing ring enhancing tumour tumor lobe frontal parietal occipital left right "
    "breast ultrasound image mass hypoechoic smooth irregular margins small medium large bright dark no"
).split()


def _vocab() -> list[str]:
    from .vocab import MEDICAL_WORDS

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = [w for w in dict.fromkeys(REPORT_WORDS + list(MEDICAL_WORDS)) if w not in chars]
    return [*SPECIAL_TOKENS, UNK, *chars, *words]


def build_tiny_processor(folder: Path | None = None):
    """The tiny preset's ``Qwen2VLProcessor`` (word-level, lower-cased tokenizer); saved to ``folder`` if given."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab = {t: i for i, t in enumerate(_vocab())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies " ." -> "."
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), padding_side="left", model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    sizes = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2,
             "min_pixels": TINY_PIXELS[0], "max_pixels": TINY_PIXELS[1]}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE)
    if folder is not None:
        processor.save_pretrained(folder)
    return processor


def tiny_config(processor):
    """Qwen2-VL config with small towers; token ids from ``processor``'s tokenizer."""
    from transformers import Qwen2VLConfig

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, mlp_ratio=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def _build_tiny_vlm(folder: Path, final: Path) -> None:
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    processor = build_tiny_processor(folder)
    with seeded(0):
        model = Qwen2VLForConditionalGeneration(tiny_config(processor))
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               do_sample=False, max_new_tokens=24)
    model.save_pretrained(folder, safe_serialization=True)


def resolve_vlm(name: str) -> str:
    """``tiny`` -> the preset folder; a folder with ``config.json`` -> itself; a hub id -> its snapshot."""
    if name == "tiny":
        return str(build_once("tiny-vlm", _build_tiny_vlm))
    path = Path(name.removeprefix("local-dir:"))
    if name.startswith("local-dir:") or path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"VLM folder '{path}' has no config.json; expected a folder written by "
                                         "save_pretrained (model + processor), e.g. from negdpo.segmentation.vlm_train")
        return str(path)
    repo = name.removeprefix("hf-hub:")
    if repo.count("/") == 1:
        return hub_snapshot(repo, "vision-language model", (
            f"Download it where the hub is reachable (`huggingface-cli download {repo}`) and copy the cache, "
            "pass a local folder, or use the offline preset `tiny`."))
    raise ModelNotAvailableError(f"unknown VLM '{name}': use 'tiny', a hub id '<org>/<repo>' or a local folder")


def load_vlm(name: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model in eval mode, processor) of a Qwen2-VL-class model; ``transformers`` picks the class from
    the folder's config (``AutoModelForImageTextToText``), without remote code."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_vlm(name)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32,
                                                        trust_remote_code=False)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
    return model.to(device).eval(), processor
