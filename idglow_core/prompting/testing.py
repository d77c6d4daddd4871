"""Tiny, randomly initialised Qwen2.5-VL and Qwen3-VL models that build fully offline (for tests and smoke runs).

Nothing is downloaded: the tokenizer is a byte-level BPE built in memory (256 byte tokens + 8 specials, one token
per byte, covers any UTF-8 text), the processor uses the PIL image backend, and the models come from configs.

    from idglow_core.prompting.testing import build_tiny_vlm, save_tiny_vlm
    bundle = build_tiny_vlm("qwen2_5_vl")          # VLMBundle(model, processor, family, ...)
    folder = save_tiny_vlm(tmp_path / "vlm", "qwen3_vl")   # a folder that load_vlm() reads
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError
from ..testing import SPECIAL_TOKENS
from .vlm import VLMBundle, offline_processor_class

__all__ = ["TINY_FAMILIES", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tokenizer", "build_processor", "build_tiny_vlm",
           "save_tiny_vlm"]


# Qwen2-VL style chat template: string or structured content, one vision block per image entry.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
_HIDDEN = 32  # text hidden size; mrope_section must sum to head_dim / 2 = 32 / 2 heads / 2 = 8


def _byte_symbols() -> list[str]:
    """The 256 GPT-2 byte-to-unicode symbols that a ByteLevel pre-tokenizer emits, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def build_tokenizer():
    """A 264-id byte-level ``Qwen2Tokenizer`` built in memory (no merges: one token per byte)."""
    from transformers import Qwen2Tokenizer

    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens={})
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(family: str, tokenizer=None):
    """The family's processor with a PIL image processor and no video processor (works without torchvision).

    Qwen2.5-VL uses 14 px patches, Qwen3-VL 16 px; both merge 2x2 patches into one image token.
    """
    from transformers import Qwen2VLImageProcessorPil

    _check_family(family)
    tokenizer = tokenizer or build_tokenizer()
    patch = 14 if family == "qwen2_5_vl" else 16
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                               min_pixels=(2 * patch) ** 2, max_pixels=(8 * patch) ** 2)
    cls = offline_processor_class(family)
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
               chat_template=CHAT_TEMPLATE)


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise InputError(f"No tiny builder for VLM family '{family}'. Use one of {', '.join(TINY_FAMILIES)}.")


def _token_ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _tiny_config(family: str, tok):
    ids = _token_ids(tok)
    common_text = dict(hidden_size=_HIDDEN, intermediate_size=_HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), bos_token_id=ids["<|endoftext|>"],
                       eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text = dict(common_text, rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
                    rope_theta=1e6)
        vision = dict(depth=2, hidden_size=_HIDDEN, intermediate_size=_HIDDEN, num_heads=2, out_hidden_size=_HIDDEN,
                      fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    from transformers import Qwen3VLConfig

    text = dict(common_text, head_dim=16,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 2, 4], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=_HIDDEN, intermediate_size=_HIDDEN, num_heads=2, out_hidden_size=_HIDDEN,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **special)


def build_tiny_vlm(family: str = "qwen2_5_vl", seed: int = 0) -> VLMBundle:
    """A tiny random VLM (about 0.1 M parameters) with its offline processor, in eval mode on CPU.

    The same ``family`` and ``seed`` always give the same weights.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    _check_family(family)
    tok = build_tokenizer()
    config = _tiny_config(family, tok)
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return VLMBundle(model=model.eval(), processor=build_processor(family, tok), family=family,
                     source=f"tiny:{family}:seed{seed}")


def save_tiny_vlm(folder: str | os.PathLike, family: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write a tiny VLM as a Hugging Face folder (config, safetensors, tokenizer, processor) and return it."""
    folder = Path(folder)
    bundle = build_tiny_vlm(family, seed)
    bundle.model.save_pretrained(folder, safe_serialization=True)
    # ProcessorMixin.save_pretrained trips over the missing video processor; save its parts instead.
    bundle.processor.tokenizer.save_pretrained(folder)
    bundle.processor.image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return folder
