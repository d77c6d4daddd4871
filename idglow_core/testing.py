"""A tiny, random, fully offline Qwen-Image-Edit-Plus (2511-style) stack for tests and smoke runs.

Nothing is downloaded: models are built from configs, the tokenizer from an in-memory byte vocabulary
(256 byte tokens + 8 specials, no merges, so any UTF-8 text encodes), the processor from the PIL image
processor (no torchvision). Seconds to build, milliseconds per denoising step on a CPU::

    from idglow_core.testing import tiny_edit_pipeline, small_edit_images
    pipe = tiny_edit_pipeline()                      # QwenImageEditPlusPipeline, tiny, random, CPU
    with small_edit_images():                        # refs resized to 64x64 instead of ~1024x1024
        out = pipe(image=[pil], prompt="a photo", num_inference_steps=2, height=32, width=32)

Config rules that must hold when you change a size: transformer ``in_channels = 4 * vae z_dim`` and
``out_channels = z_dim`` (2x2 packing); ``sum(axes_dims_rope) == attention_head_dim``;
``joint_attention_dim == text hidden size``; the text ``mrope_section`` sums to head_dim / 2.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["SPECIAL_TOKENS", "tiny_transformer", "tiny_vae", "tiny_scheduler", "tiny_tokenizer", "tiny_processor",
           "tiny_text_encoder", "tiny_edit_pipeline", "save_tiny_pipeline", "small_edit_images",
           "random_embeddings", "OneFaceAnalyzer"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
Z_DIM = 4  # tiny VAE latent channels


def tiny_transformer(num_layers: int = 2, heads: int = 3, head_dim: int = 16, joint_dim: int = 16,
                     seed: int = 0):
    """Random ``QwenImageTransformer2DModel`` (inner dim ``heads * head_dim``; 190,720 params by default)."""
    from diffusers import QwenImageTransformer2DModel

    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 4 (rope axes split it in 2/4, 1/4, 1/4).")
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        guidance_embeds=False, axes_dims_rope=(head_dim // 2, head_dim // 4, head_dim // 4),
        zero_cond_t=True)  # as Qwen-Image-Edit-2511: reference tokens are modulated at t = 0


def tiny_vae(seed: int = 0):
    """Random ``AutoencoderKLQwenImage`` with z_dim 4 and x4 spatial downsampling."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=24, z_dim=Z_DIM, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.0] * Z_DIM,
                                  latents_std=[1.0] * Z_DIM).eval()


def tiny_scheduler():
    """``FlowMatchEulerDiscreteScheduler`` with the real Qwen-Image scheduler_config values."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                           max_image_seq_len=8192, shift_terminal=0.02,
                                           time_shift_type="exponential")


def _byte_symbols() -> list[str]:
    """The 256 printable symbols a byte-level BPE pre-tokenizer maps bytes to (GPT-2's table)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return sorted(chr(b) if b in printable else chr(next(extra)) for b in range(256))


def tiny_tokenizer():
    """Offline ``Qwen2Tokenizer``: 264 ids, one token per byte, Qwen's special tokens and a chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", extra_special_tokens={})
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_processor(tokenizer=None):
    """``Qwen2VLProcessor`` on the PIL image processor, constructible without torchvision."""
    from transformers import Qwen2VLImageProcessorPil

    from .pipeline import offline_processor

    return offline_processor(Qwen2VLImageProcessorPil(), tokenizer or tiny_tokenizer(), CHAT_TEMPLATE)


def tiny_text_encoder(tokenizer, hidden: int = 16, seed: int = 0):
    """Random ``Qwen2_5_VLForConditionalGeneration`` (2 heads, 2 layers) matching ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    quarter = hidden // 16  # mrope_section sums to head_dim / 2 = hidden / 4
    text = dict(hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=len(tokenizer), rope_theta=1e6,
                rope_scaling={"mrope_section": [quarter, quarter, hidden // 4 - 2 * quarter],
                              "rope_type": "default", "type": "default"},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=hidden, intermediate_size=hidden, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[1])
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_edit_pipeline(text_encoder: bool = True, num_layers: int = 2, seed: int = 0, heads: int = 3):
    """A ``QwenImageEditPlusPipeline`` of tiny random parts on CPU, progress bar off (DiT inner dim
    ``heads * 16``: more heads make the DiT the larger part of the cost, as at real size).

    ``text_encoder=False`` leaves text encoder, tokenizer and processor out: call it with ``prompt_embeds``
    ``[1, L, 16]`` and ``prompt_embeds_mask`` instead of a prompt.
    """
    from diffusers import QwenImageEditPlusPipeline

    parts = dict(transformer=tiny_transformer(num_layers=num_layers, heads=heads, seed=seed), vae=tiny_vae(seed),
                 scheduler=tiny_scheduler(), text_encoder=None, tokenizer=None, processor=None)
    if text_encoder:
        tok = tiny_tokenizer()
        parts.update(tokenizer=tok, processor=tiny_processor(tok), text_encoder=tiny_text_encoder(tok, seed=seed))
    pipe = QwenImageEditPlusPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(pipe, folder: str | os.PathLike) -> Path:
    """Write ``pipe`` as a diffusers folder laid out like the real Qwen-Image-Edit-2511 repository.

    diffusers cannot save a processor without a video processor, so ``processor/`` is written from its
    image processor, tokenizer and chat template, and model_index.json names ``Qwen2VLProcessor`` as the
    real one does. Load it back with ``idglow_core.pipeline.load_edit_pipeline(folder)``.
    """
    folder = Path(folder)
    processor = pipe.processor
    pipe.register_modules(processor=None)
    try:
        pipe.save_pretrained(folder)
    finally:
        pipe.register_modules(processor=processor)
    if processor is not None:
        processor.image_processor.save_pretrained(folder / "processor")
        processor.tokenizer.save_pretrained(folder / "processor")
        index = json.loads((folder / "model_index.json").read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@contextlib.contextmanager
def small_edit_images(pixels: int = 64 * 64) -> Iterator[None]:
    """Make QwenImageEditPlusPipeline resize references to ``pixels`` (default 64x64) for both the VAE
    (~1024x1024 normally) and the VLM (384x384 normally): 77 s -> 0.1 s per tiny call. Restored on exit."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    saved = mod.CONDITION_IMAGE_SIZE, mod.VAE_IMAGE_SIZE
    mod.CONDITION_IMAGE_SIZE = mod.VAE_IMAGE_SIZE = pixels
    try:
        yield
    finally:
        mod.CONDITION_IMAGE_SIZE, mod.VAE_IMAGE_SIZE = saved


def random_embeddings(k: int, dim: int = 512, seed: int = 0) -> torch.Tensor:
    """``[k, dim]`` L2-normalised random vectors standing in for ArcFace embeddings."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(k, dim, generator=g)
    return e / e.norm(dim=-1, keepdim=True)


class OneFaceAnalyzer:
    """A :class:`~idglow_core.faces.FaceAnalyzer` stand-in that finds one fixed, centred face in every image, with
    an 8-d embedding derived from the image's mean colour: fast and deterministic, so trainer smoke tests can run
    the ID-loss path on a tiny random model whose decoded images hold no real face."""

    name, embedding_dim = "stub", 8

    def analyze(self, image):
        import numpy as np

        from .faces.base import Face

        h, w = image.shape[:2]
        kps = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32) * [w, h]
        emb = np.resize(image.reshape(-1, 3).mean(0), 8).astype(np.float32) + np.arange(8, dtype=np.float32)
        return [Face(np.array([0, 0, w, h], np.float32), kps.astype(np.float32), 1.0, emb / np.linalg.norm(emb))]
