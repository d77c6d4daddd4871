"""The IdGlow patch for ComfyUI's native Qwen-Image DiT. No ComfyUI import at module level (tests run it bare).

``model_nodes.apply_idglow`` clones the MODEL and installs one :class:`IdGlowPatch`, a ``double_block`` patch
(called by ``QwenImageTransformer2DModel`` after every dual-stream block with ``{"img", "txt", "x", "block_index",
"transformer_options"}``) that does, on the target tokens only::

    img[:, :n] += adapter.block_residual(i, img[:, :n], tokens, mask, scale, token_weights)
    scale[b] = weight * Omega(sigma_b)        sigma = transformer_options["sigmas"] (flow time t, read per call)

``n`` = ``ceil(H/2) * ceil(W/2)`` from the latent ``x``; the reference-latent tokens after them are untouched.

The block index is never trusted blindly: block i's adapter weights applied to another block would corrupt the
output with no error (newer ComfyUI can restart ``block_index`` at 0 for blocks it offloads). The patch takes
``transformer_options["block_index"]`` / ``["total_blocks"]`` where ComfyUI sets them (0.8.0), checks them against
the patch argument and the adapter's depth, and counts its own calls: the c-th call of a forward must be block
``c mod num_blocks``. Any mismatch raises :class:`BlockIndexError`.
Because sigma is read at sample time and the schedule is in t units, ModelSampling nodes anywhere in the graph
do not move the window.

Rows of the model batch are chunks of the latent batch; ``cond_or_uncond`` holds each chunk's index in the
guider's list of conds, which is not a label (KSampler: [positive, negative]; DualCFGGuider: [negative, middle,
positive]). For ``apply_to='positive'`` the OUTER_SAMPLE wrapper :func:`mark_positive` puts the positive conds'
uuids in ``transformer_options`` and the patch matches them with ``transformer_options["uuids"]``.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from idglow_core.adapter import IdCondition, IdGlowAdapter
from idglow_core.errors import IdGlowError, IncompatibleAdapterError, InputError

__all__ = ["IdGlowPatch", "BlockIndexError", "block_index", "target_token_count", "check_adapter_fits", "mark_positive", "APPLY_TO", "POSITIVE_UUIDS"]

log = logging.getLogger("idglow")
APPLY_TO = ("both", "positive")
POSITIVE_UUIDS = "idglow_positive_uuids"  # transformer_options key set by mark_positive
BLOCK_CALLS = "idglow_block_calls"        # transformer_options key: calls of the patch in this forward


class BlockIndexError(IdGlowError, RuntimeError):
    """ComfyUI reported a block index that does not match the block actually running."""


def block_index(kw: dict, num_blocks: int) -> int:
    """The index of the dual-stream block that just ran, checked three ways (see the module docstring).

    kw: the double_block patch argument. num_blocks: the adapter's depth. Raises :class:`BlockIndexError`.
    """
    options = kw.get("transformer_options") or {}
    index = int(kw["block_index"])
    if "block_index" in options and int(options["block_index"]) != index:
        raise BlockIndexError(f"ComfyUI passed block_index {index} to the patch but transformer_options says "
                              f"{options['block_index']}. {_UPDATE}")
    total = options.get("total_blocks")
    if total is not None and int(total) != num_blocks:
        raise BlockIndexError(f"The DiT runs {total} dual-stream blocks but the IdGlow adapter has {num_blocks}. "
                              f"Use an adapter made for this model.")
    calls = options.setdefault(BLOCK_CALLS, [0])
    expected = calls[0] % num_blocks
    calls[0] += 1
    if index != expected:
        raise BlockIndexError(f"The IdGlow patch was called for block_index {index} where block {expected} runs "
                              f"(call {calls[0]} of this forward). ComfyUI's block numbering is not the blocks' "
                              f"order here (e.g. an offloading mode that restarts the index at 0), so block "
                              f"{index}'s adapter weights would land on another block. {_UPDATE}")
    return index


_UPDATE = ("Update ComfyUI-IdGlow, or turn off the offloading option that changes block order, and report the "
           "ComfyUI version at the IdGlow issue tracker.")


def mark_positive(executor: Any, *args: Any, **kwargs: Any) -> Any:
    """OUTER_SAMPLE wrapper: records the uuids of the guider's positive conds for this sampling run.

    ``executor.class_obj`` is the guider; its ``model_options`` is a per-run copy (``CFGGuider.sample``), which
    ComfyUI merges into the ``transformer_options`` of every model call.
    """
    guider = executor.class_obj
    conds, options = getattr(guider, "conds", None), getattr(guider, "model_options", None)
    if isinstance(conds, dict) and isinstance(options, dict):  # else the patch falls back to chunk 0 = positive
        uuids = {c["uuid"] for c in conds.get("positive") or [] if isinstance(c, dict) and "uuid" in c}
        options.setdefault("transformer_options", {})[POSITIVE_UUIDS] = uuids
    return executor(*args, **kwargs)


def positive_chunks(transformer_options: dict, chunks: list) -> list[bool]:
    """Which chunks of the model batch belong to the positive prompt."""
    positive, uuids = transformer_options.get(POSITIVE_UUIDS), transformer_options.get("uuids")
    if positive and uuids is not None and len(uuids) == len(chunks):
        return [u in positive for u in uuids]
    return [c == 0 for c in chunks]  # KSampler / CFGGuider order: 0 = positive, 1 = negative


def target_token_count(x: torch.Tensor) -> int:
    """Number of target image tokens for a DiT input latent ``x [B, C, (T,) H, W]`` (2x2 patches, padded)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    return ((h + 1) // 2) * ((w + 1) // 2)


def check_adapter_fits(adapter: IdGlowAdapter, diffusion_model: Any) -> None:
    """Raise :class:`IncompatibleAdapterError` when the adapter was made for another DiT width or depth."""
    blocks = getattr(diffusion_model, "transformer_blocks", None)
    width = getattr(diffusion_model, "inner_dim", None)
    if blocks is None or width is None:
        raise IncompatibleAdapterError(f"The MODEL is a {type(diffusion_model).__name__}, not a Qwen-Image DiT. "
                                       f"IdGlow adapters patch Qwen-Image(-Edit) models: load one with UNETLoader.")
    cfg = adapter.config
    bad = [f"{name}: adapter {a}, model {b}" for name, a, b in
           (("hidden width", cfg.hidden_dim, int(width)), ("dual-stream blocks", cfg.num_blocks, len(blocks))) if a != b]
    if bad:
        raise IncompatibleAdapterError(f"This IdGlow adapter does not fit the model ({'; '.join(bad)}). Use an adapter "
                                       f"trained for this {cfg.base_family} model size.")


class IdGlowPatch:
    """A ``double_block`` patch object (``__call__``, ``to``, ``models``: the protocol ComfyUI's model patches use).

    adapter_patcher: the ModelPatcher wrapping ``adapter`` (returned by :meth:`models`, so ComfyUI loads and
    offloads it with the DiT). apply_to: 'both' (every CFG branch, as in training) or 'positive' only.
    """

    def __init__(self, adapter: IdGlowAdapter, cond: IdCondition, apply_to: str = "both",
                 adapter_patcher: Any = None):
        if apply_to not in APPLY_TO:
            raise InputError(f"apply_to={apply_to!r} must be one of {APPLY_TO}.")
        self.adapter, self.cond, self.apply_to, self.adapter_patcher = adapter, cond, apply_to, adapter_patcher

    def __deepcopy__(self, memo: dict) -> "IdGlowPatch":
        return self  # ModelPatcher.clone() deep-copies model_options: share the adapter, never copy it

    def scales(self, transformer_options: dict, batch: int) -> torch.Tensor | None:
        """``[batch]`` = weight * Omega(sigma) per row of the model batch, or None outside sampling."""
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return None
        s = self.cond.scale(torch.as_tensor(sigmas).reshape(-1).float().clamp(0.0, 1.0))
        chunks = list(transformer_options.get("cond_or_uncond") or [0])
        if s.numel() * len(chunks) == batch:      # sigmas are per latent sample; the batch is chunks of those
            s = s.repeat(len(chunks))
        elif s.numel() != batch:
            s = s.max().expand(batch)
        if self.apply_to == "positive" and batch % len(chunks) == 0:
            keep = torch.tensor(positive_chunks(transformer_options, chunks), dtype=s.dtype, device=s.device)
            s = s * keep.repeat_interleave(batch // len(chunks))
        return s

    def __call__(self, kw: dict) -> dict:
        img = kw["img"]
        index = block_index(kw, self.adapter.config.num_blocks)  # checked on every call, injecting or not
        s = self.scales(kw["transformer_options"], img.shape[0])
        if s is None or not bool((s != 0).any()):
            return kw  # Omega(t) = 0 or weight 0: the block output stays bit-identical
        n = min(target_token_count(kw["x"]), img.shape[1])
        c = self.cond
        res = self.adapter.block_residual(index, img[:, :n], c.tokens, c.mask, s.to(img.device),
                                          c.token_weights)
        kw["img"] = torch.cat([img[:, :n] + res.to(img.device), img[:, n:]], dim=1)
        return kw

    def to(self, device_or_dtype: Any) -> "IdGlowPatch":
        """Called by ComfyUI when it moves the model; the ID tokens follow the device (the adapter's dtype is kept)."""
        if isinstance(device_or_dtype, torch.device):
            c = self.cond
            move = (lambda t: None if t is None else t.to(device_or_dtype))
            self.cond = IdCondition(move(c.tokens), move(c.mask), c.weight, c.schedule, move(c.token_weights))
        return self

    def models(self) -> list:
        return [] if self.adapter_patcher is None else [self.adapter_patcher]
