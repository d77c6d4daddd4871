"""Tiny random CLIP (model + tokenizer) saved as a Hugging Face folder, for offline tests and smoke runs.

    from idglow_core.preference.testing import write_tiny_clip
    folder = write_tiny_clip(tmp_path / "clip")          # loads with ClipEncoder.from_dir(folder)

The tokenizer is a CLIP BPE with the 256 GPT-2 byte symbols (each also with the ``</w>`` word-end suffix), the
two CLIP specials and no merges, so any text encodes, one token per byte, without a download.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["tiny_clip_tokenizer", "write_tiny_clip"]


def _byte_symbols() -> list[str]:
    """The GPT-2 byte-to-unicode table (printable stand-ins for the 256 byte values)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_clip_tokenizer():
    """A ``CLIPTokenizer`` with a 514-token byte vocabulary (no merges)."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[])


def write_tiny_clip(folder: str | Path, seed: int = 0, image_size: int = 28, projection_dim: int = 16) -> Path:
    """Save a random 1-layer CLIPModel (hidden 32) and its tokenizer to ``folder``; return the folder."""
    from transformers import CLIPConfig, CLIPModel

    tok = tiny_clip_tokenizer()
    specials = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = CLIPConfig(text_config={**small, **specials, "vocab_size": len(tok), "max_position_embeddings": 77},
                     vision_config={**small, "image_size": image_size, "patch_size": 14},
                     projection_dim=projection_dim)
    torch.manual_seed(seed)
    folder = Path(folder)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
