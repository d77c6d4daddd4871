"""IdGlow adapter: the multi-ID encoder plus one multi-ID cross-attention per dual-stream DiT block.

Per block i, on the *target* image tokens only (Qwen-Image-Edit appends reference-image tokens after them;
those are never changed)::

    h[:, :n] += weight * Omega(t) * W_out( Attn( q = W_q LN(h[:, :n]),  k/v = W_k/W_v id_tokens, id_mask ) )

``W_out`` is zero-initialised, so a fresh adapter leaves the DiT bit-identical, as does weight 0.

Budget (real 2511 DiT: 60 blocks, width 3072): a full-width q/out pair per block would add ~2 B params and
~4.7 % FLOPs. The attention here runs at ``inner_dim`` = 512 (8 heads of 64) and ID tokens of width 1024:
~4.2 M params per block, 260.8 M in all with the encoder (1.28 % of 20.43 B), 0.77 % of a block's FLOPs
for 1024 target + 2048 reference + 128 text tokens (~2 % of its time measured on CPU fp32).
``bench/bench_adapter.py`` measures both. Queries come from the block's output through an own narrow
projection rather than reusing the block's attention queries: the hook then needs no change inside the
attention processor, and ComfyUI's after-block patch can run the same math.

Two hosts, one set of weights (``state_dict`` keys ``encoder.*`` and ``blocks.{i}.*``):

* diffusers ``QwenImageTransformer2DModel``: ``handle = adapter.attach(transformer)``, then
  ``transformer(..., attention_kwargs={"idglow": adapter.condition(emb)})``. The condition travels inside
  the block inputs, so gradient checkpointing recomputes with the same values. ``handle.detach()`` removes
  every hook (``adapter_hooks.py``; needs diffusers >= 0.37.0, and a condition no block received raises).
* any other host (ComfyUI's ``set_model_double_block_patch``): after block ``i`` call
  ``img[:, :n] += adapter.block_residual(i, img[:, :n], tokens, mask, scale)`` where ``n`` = number of target
  tokens (``ceil(H/2) * ceil(W/2)`` of the latent ``x``) and ``scale[B] = weight * Omega(sigma)`` with sigma
  = ``transformer_options["sigmas"]``; tokens/mask come from ``adapter.encode(embeddings)``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter_hooks import KWARG, MIN_DIFFUSERS, AttachedAdapter, check_diffusers_version  # noqa: F401
from .errors import IncompatibleAdapterError, InputError, ModelFormatError, ModelNotFoundError
from .id_encoder import MultiIdEncoder, check_finite, expand_id_weights
from .schedules import Schedule

__all__ = ["AdapterConfig", "IdCondition", "IdCrossAttention", "IdGlowAdapter", "AttachedAdapter", "count_parameters",
           "KWARG", "MIN_DIFFUSERS", "TRAIN_INJECTION_KEY", "check_diffusers_version"]

log = logging.getLogger("idglow")
FORMAT = "idglow-adapter"
FORMAT_VERSION = 1
TRAIN_INJECTION_KEY = "train_injection"  # metadata: JSON {task: schedule} the trainer injected with ("*" = any)


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of an adapter. ``hidden_dim``/``num_blocks`` must match the DiT (3072 / 60 for 2511)."""

    hidden_dim: int
    num_blocks: int
    inner_dim: int = 512          # attention width; full 3072 would cost ~4.7 % FLOPs and ~2 B params
    head_dim: int = 64
    token_dim: int = 1024         # width of the identity tokens
    tokens_per_id: int = 8        # N
    max_ids: int = 4              # K
    id_dim: int = 512             # ArcFace; 128 for an adapter trained on dlib embeddings
    base_family: str = "qwen-image"
    default_schedule: str = field(default_factory=lambda: Schedule("constant").to_str())

    def __post_init__(self) -> None:
        ints = {f.name: getattr(self, f.name) for f in fields(self) if f.type in ("int", int)}
        if any(not isinstance(v, int) or v < 1 for v in ints.values()):
            raise InputError(f"Adapter sizes must be positive integers, got {ints}.")
        if self.inner_dim % self.head_dim:
            raise InputError(f"inner_dim={self.inner_dim} is not a multiple of head_dim={self.head_dim}.")
        Schedule.parse(self.default_schedule)

    def to_metadata(self) -> dict[str, str]:
        meta = {k: str(v) for k, v in asdict(self).items()}
        meta.update(format=FORMAT, format_version=str(FORMAT_VERSION))
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "AdapterConfig":
        if meta.get("format") != FORMAT:
            raise ModelFormatError(f"Not an IdGlow adapter file (metadata format={meta.get('format')!r}). "
                                   f"Pick a file saved by IdGlowAdapter.save or an IdGlow trainer.")
        if int(meta.get("format_version", "0")) > FORMAT_VERSION:
            raise ModelFormatError(f"Adapter format version {meta['format_version']} is newer than this IdGlow "
                                   f"(reads <= {FORMAT_VERSION}). Update IdGlow.")
        try:
            kw = {f.name: (int(meta[f.name]) if f.type in ("int", int) else meta[f.name])
                  for f in fields(cls) if f.name in meta}
            return cls(**kw)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"Adapter metadata is incomplete or malformed ({exc}): {meta}.") from None


@dataclass
class IdCondition:
    """What a diffusers call carries in ``attention_kwargs["idglow"]``.

    tokens: ``[B or 1, T, token_dim]``; mask: ``[B or 1, T]`` bool (True = real token) or None;
    weight: float or ``[B]``; schedule: Omega(t) applied to the call's timestep (sigma);
    token_weights: ``[B or 1, T]`` per-token (per-identity) value weights or None;
    compute_always: compute the residual (then multiplied by its scale) even when every scale is 0, so that
    every adapter parameter takes part in the graph (training under DDP); inference skips that work.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    weight: float | torch.Tensor = 1.0
    schedule: Schedule = field(default_factory=lambda: Schedule("constant"))
    token_weights: torch.Tensor | None = None
    compute_always: bool = False

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """``weight * Omega(sigma)`` for ``sigma [B]`` -> ``[B]`` float32."""
        w = torch.as_tensor(self.weight, dtype=torch.float32, device=sigma.device)
        return (w * self.schedule(sigma.detach().float())).float()


class IdCrossAttention(nn.Module):
    """Cross-attention from image tokens to identity tokens with a zero-initialised output projection."""

    def __init__(self, hidden_dim: int, inner_dim: int, head_dim: int, token_dim: int):
        super().__init__()
        self.heads, self.head_dim = inner_dim // head_dim, head_dim
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.to_q = nn.Linear(hidden_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(token_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(token_dim, inner_dim, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.Linear(inner_dim, hidden_dim)
        nn.init.zeros_(self.to_out.weight)  # a fresh adapter adds exactly 0
        nn.init.zeros_(self.to_out.bias)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """h: ``[B, L, hidden]``; tokens: ``[B, T, token_dim]``; mask/token_weights ``[B, T]`` -> ``[B, L, hidden]``."""
        B, L, _ = h.shape
        T = tokens.shape[1]
        q = self.norm_q(self.to_q(self.norm(h)).view(B, L, self.heads, self.head_dim)).transpose(1, 2)
        k = self.norm_k(self.to_k(tokens).view(B, T, self.heads, self.head_dim)).transpose(1, 2)
        v = self.to_v(tokens)
        if token_weights is not None:  # per-identity strength: scales that identity's values
            v = v * token_weights[:, :, None].to(v.dtype)
        v = v.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        attn_mask, valid = None, None
        if mask is not None:
            valid = mask.any(dim=1)                       # a sample with no identity gets no residual
            attn_mask = (mask | ~valid[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.to_out(o.transpose(1, 2).reshape(B, L, -1))
        return out if valid is None else out * valid[:, None, None].to(out.dtype)


class IdGlowAdapter(nn.Module):
    """Multi-ID encoder + ``num_blocks`` cross-attentions. Build with :meth:`init_for` or :meth:`load`."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.encoder = MultiIdEncoder(config.id_dim, config.token_dim, config.tokens_per_id, config.max_ids)
        self.blocks = nn.ModuleList(IdCrossAttention(config.hidden_dim, config.inner_dim, config.head_dim,
                                                     config.token_dim) for _ in range(config.num_blocks))
        # {task: schedule string} the trainer injected with ("*" = every task); None = unknown (not from a trainer)
        self.trained_injection: dict[str, str] | None = None

    # ------------------------------------------------------------------ construction and files
    @classmethod
    def init_for(cls, transformer: nn.Module, **overrides: Any) -> "IdGlowAdapter":
        """A fresh (zero-output) adapter sized for a Qwen-Image transformer of any width and depth.

        ``overrides`` set AdapterConfig fields; inner/token width default to min(512/1024, DiT width).
        """
        hidden, blocks = _transformer_shape(transformer)
        inner = overrides.pop("inner_dim", min(512, hidden))
        head = overrides.pop("head_dim", min(64, inner))
        token = overrides.pop("token_dim", min(1024, hidden))
        return cls(AdapterConfig(hidden_dim=hidden, num_blocks=blocks, inner_dim=inner, head_dim=head,
                                 token_dim=token, **overrides))

    @property
    def default_schedule(self) -> Schedule:
        return Schedule.parse(self.config.default_schedule)

    def check_fits(self, transformer: nn.Module) -> None:
        """Raise :class:`IncompatibleAdapterError` naming every size that differs from ``transformer``."""
        hidden, blocks = _transformer_shape(transformer)
        bad = [f"{name}: adapter {mine}, model {theirs}" for name, mine, theirs in
               (("hidden width", self.config.hidden_dim, hidden),
                ("dual-stream blocks", self.config.num_blocks, blocks))
               if mine != theirs]
        if bad:
            raise IncompatibleAdapterError(f"This IdGlow adapter does not fit the model ({'; '.join(bad)}). Use an "
                                           f"adapter trained for this {self.config.base_family} model size.")

    def save(self, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
        """Write safetensors + metadata atomically (temp file + ``os.replace``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**(extra_metadata or {}), **self.config.to_metadata()}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, transformer: nn.Module | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "IdGlowAdapter":
        """Read a file written by :meth:`save`; checks it against ``transformer`` when given."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if path.is_dir():
            raise ModelNotFoundError(f"Adapter path {path} is a folder, not a file. Pass the IdGlow .safetensors "
                                     f"file inside it (e.g. {path}/idglow_adapter.safetensors).")
        if not path.is_file():
            raise ModelNotFoundError(f"Adapter file {path} does not exist. Pass the path of an IdGlow "
                                     f".safetensors adapter (e.g. models/idglow/idglow_2511.safetensors).")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ModelFormatError(f"Cannot read {path} as safetensors ({exc}). Re-download or re-save it.") from None
        adapter = cls(AdapterConfig.from_metadata(meta))
        _check_tensors(path, tensors, adapter.state_dict())
        missing, unexpected = adapter.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ModelFormatError(f"{path} does not match its own metadata: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]}. The file is damaged or was edited.")
        if transformer is not None:
            adapter.check_fits(transformer)
        adapter.trained_injection = _trained_injection(meta, path)
        return adapter.to(device=device, dtype=dtype)

    def check_deployed_schedule(self, schedule: Schedule, task: str | None = None) -> bool:
        """Warn (log) when ``schedule`` is not the injection schedule this adapter was trained with for ``task``
        (any of its tasks when None). Returns True when it matches or nothing is known about the training."""
        trained = self.trained_injection
        if not trained:
            return True
        if task is not None:
            want = trained.get(task, trained.get("*"))
            candidates = [] if want is None else [want]
        else:
            candidates = list(trained.values())
        if any(Schedule.parse(c).to_dict() == schedule.to_dict() for c in candidates):
            return True
        listed = ", ".join(f"{k}: {Schedule.parse(v).to_str()}" for k, v in trained.items())
        log.warning("IdGlow: injecting with schedule %s%s, but this adapter was trained with %s. It then runs at "
                    "another strength than it learnt at some t; use the trained schedule (leave the schedule "
                    "input unconnected / schedule=None with the trained task), or retrain.", schedule.to_str(),
                    f" for task '{task}'" if task else "", listed)
        return False

    # ------------------------------------------------------------------ host-agnostic math
    def encode(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Face embeddings ``[B, K, id_dim]`` (+ mask ``[B, K]``) -> tokens ``[B, K*N, token_dim]``, mask
        ``[B, K*N]``."""
        return self.encoder(embeddings, mask)

    def condition(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None, weight: float | torch.Tensor = 1.0,
                  schedule: Schedule | str | None = None, id_weights: torch.Tensor | None = None) -> IdCondition:
        """Encode and pack for ``attention_kwargs={"idglow": ...}``. ``id_weights``: ``[B, K]`` or ``[K]``.

        Non-finite embeddings, weight or id_weights raise :class:`InputError` (one NaN would blacken the image)."""
        check_finite(embeddings, "Face embeddings", "Re-detect the reference faces or recompute the embeddings "
                     "(a NaN often comes from a face model run in fp16, or an all-zero vector normalised).")
        check_finite(weight, "The identity weight", "Use a finite strength such as 1.0.")
        if id_weights is not None:
            check_finite(id_weights, "The per-identity weights", "Give one finite strength per reference.")
        tokens, token_mask = self.encode(embeddings, mask)
        sched = schedule if isinstance(schedule, Schedule) else (
            Schedule("constant") if schedule is None else Schedule.parse(schedule))
        tw = None
        if id_weights is not None:
            iw = torch.as_tensor(id_weights, dtype=tokens.dtype, device=tokens.device)
            iw = iw[None] if iw.ndim == 1 else iw
            if iw.shape[1] * self.config.tokens_per_id != tokens.shape[1]:
                k = tokens.shape[1] // self.config.tokens_per_id
                raise InputError(f"{iw.shape[1]} identity weights given for {k} identities; pass one weight per "
                                 f"reference.")
            tw = expand_id_weights(iw, self.config.tokens_per_id)
        return IdCondition(tokens, token_mask, weight, sched, tw)

    def block_residual(self, block_index: int, img_hidden: torch.Tensor, id_tokens: torch.Tensor,
                       id_mask: torch.Tensor | None, scale: torch.Tensor | float,
                       token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The residual to add to block ``block_index``'s image-stream output on the target tokens.

        img_hidden: ``[B, L_target, hidden]`` (target tokens only); id_tokens: ``[B or 1, T, token_dim]``;
        id_mask, token_weights: ``[B or 1, T]`` or None; scale: float or ``[B]`` (= weight * Omega(sigma)).
        Returns ``scale * CrossAttn(...)`` as ``[B, L_target, hidden]`` in img_hidden's dtype. Computed in the
        adapter's dtype; exactly zero for a fresh adapter or scale 0.
        """
        if not 0 <= block_index < len(self.blocks):
            raise InputError(f"block_index {block_index} out of range: this adapter has {len(self.blocks)} blocks.")
        B = img_hidden.shape[0]
        p = self.blocks[block_index].to_q.weight
        if img_hidden.device != p.device:
            raise InputError(f"The adapter's block {block_index} is on {p.device} but the DiT's activations are on "
                             f"{img_hidden.device}. Move the adapter to the model's device first "
                             f"(adapter.to(device); in ComfyUI the IdGlow Adapter Loader's patcher does this).")
        expand = (lambda x: None if x is None else x.to(p.device).expand(B, *x.shape[1:]))
        out = self.blocks[block_index](img_hidden.to(p.dtype), expand(id_tokens).to(p.dtype), expand(id_mask),
                                       expand(token_weights))
        s = torch.as_tensor(scale, dtype=out.dtype, device=out.device).reshape(-1, 1, 1)
        return (s * out).to(img_hidden.dtype)

    # ------------------------------------------------------------------ diffusers host
    def attach(self, transformer: nn.Module) -> "AttachedAdapter":
        """Hook into a diffusers ``QwenImageTransformer2DModel``; returns the handle to detach with.
        Needs diffusers >= :data:`MIN_DIFFUSERS` (:class:`DependencyError` otherwise)."""
        check_diffusers_version()
        self.check_fits(transformer)
        return AttachedAdapter(self, transformer)


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise :class:`ModelFormatError` listing every tensor of the file with the wrong shape or a NaN/inf value."""
    shape = [f"{k}: {tuple(t.shape)} (expected {tuple(expected[k].shape)})" for k, t in tensors.items()
             if k in expected and t.shape != expected[k].shape]
    if shape:
        raise ModelFormatError(f"{path} has {len(shape)} tensor(s) whose shape does not match its own metadata: "
                               f"{'; '.join(shape[:5])}. The file is damaged or was edited; re-export it.")
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ModelFormatError(f"{path} holds NaN or inf weights in {len(bad)} tensor(s) ({', '.join(bad[:5])}"
                               f"{', ...' if len(bad) > 5 else ''}), e.g. saved from a training run that diverged. "
                               f"Use an earlier checkpoint or retrain with a lower learning rate.")


def _trained_injection(meta: dict[str, str], path: Path) -> dict[str, str] | None:
    """The ``train_injection`` metadata of a trainer's adapter file. A trainer's file without it predates
    schedule-aware training: it was trained at constant strength 1 for every task."""
    raw = meta.get(TRAIN_INJECTION_KEY)
    if raw is None:
        return {"*": Schedule("constant").to_str()} if meta.get("trainer") else None
    try:
        data = json.loads(raw)
        return {str(k): Schedule.parse(v).to_str() for k, v in dict(data).items()}
    except (ValueError, TypeError) as exc:
        raise ModelFormatError(f"{path}: metadata '{TRAIN_INJECTION_KEY}' is not a JSON mapping of task to "
                               f"schedule ({exc}): {raw!r}. The file was edited or damaged.") from None


def _transformer_shape(transformer: nn.Module) -> tuple[int, int]:
    """(width, dual-stream blocks) of a diffusers or ComfyUI Qwen-Image DiT (both have ``inner_dim``)."""
    blocks = getattr(transformer, "transformer_blocks", None)
    width = getattr(transformer, "inner_dim", None)
    cfg = getattr(transformer, "config", None)
    if width is None and hasattr(cfg, "num_attention_heads"):
        width = cfg.num_attention_heads * cfg.attention_head_dim
    if blocks is None or width is None:
        raise IncompatibleAdapterError(f"{type(transformer).__name__} is not a Qwen-Image transformer (no "
                                       f"transformer_blocks / inner_dim). Pass pipe.transformer of a Qwen-Image(-Edit)"
                                       f" pipeline, or ComfyUI's model.diffusion_model.")
    return int(width), len(blocks)


def count_parameters(config: AdapterConfig) -> int:
    """Parameters of an adapter with ``config``, counted analytically (no allocation; used by the bench)."""
    d, n, h, i = config.token_dim, config.tokens_per_id, config.hidden_dim, config.inner_dim
    encoder = (config.id_dim * d + d) + (d * n * d + n * d) + 2 * d + config.max_ids * d
    block = h * i + 2 * d * i + 2 * config.head_dim + i * h + h
    return encoder + config.num_blocks * block
