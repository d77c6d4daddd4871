"""Qwen-Image-Edit(-Plus/2511) input packing for training, as ``QwenImageEditPlusPipeline.prepare_latents``.

Latents are 5-D ``[B, C, 1, h, w]`` (normalised with the VAE's latents_mean/std). The transformer sees
``hidden_states = cat([pack(z_t), pack(ref_1), ..., pack(ref_k)], dim=1)`` with
``img_shapes[b] = [(1, h/2, w/2), (1, h_1/2, w_1/2), ...]``; only the first ``h/2 * w/2`` output tokens are the
prediction for the target (with ``zero_cond_t`` the reference tokens are modulated as t = 0).
"""
from __future__ import annotations

import torch

from ..errors import InputError

__all__ = ["pack_latents", "unpack_latents", "edit_inputs"]


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, 1, h, w]`` -> ``[B, h/2 * w/2, 4C]`` (2x2 patches, channel-major inside a patch)."""
    if z.ndim != 5 or z.shape[2] != 1 or z.shape[3] % 2 or z.shape[4] % 2:
        raise InputError(f"Latents must be [B, C, 1, h, w] with even h and w, got {tuple(z.shape)}. Use image "
                         f"sides that are multiples of 16 pixels.")
    b, c, _, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, h/2 * w/2, 4C]`` -> ``[B, C, 1, h, w]``."""
    b, n, c4 = tokens.shape
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise InputError(f"{n} tokens of width {c4} cannot be unpacked to a {h}x{w} latent.")
    z = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c4 // 4, 1, h, w)


def edit_inputs(z_t: torch.Tensor, ref_latents: list[torch.Tensor], t: torch.Tensor) -> dict:
    """Transformer keyword arguments for a noisy target ``z_t [B, C, 1, h, w]`` and clean references
    (each ``[B, C, 1, h_j, w_j]``) at flow time ``t [B]`` (the transformer's ``timestep`` is t itself)."""
    b, _, _, h, w = z_t.shape
    tokens = [pack_latents(z_t)] + [pack_latents(r.to(z_t.dtype)) for r in ref_latents]
    shapes = [(1, h // 2, w // 2)] + [(1, r.shape[-2] // 2, r.shape[-1] // 2) for r in ref_latents]
    return dict(hidden_states=torch.cat(tokens, dim=1), timestep=t.to(z_t.dtype), img_shapes=[shapes] * b)
