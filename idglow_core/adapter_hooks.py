"""The diffusers host of the IdGlow adapter: hooks on a ``QwenImageTransformer2DModel`` and its blocks.

The caller puts an :class:`~idglow_core.adapter.IdCondition` in ``attention_kwargs["idglow"]``; the model's
pre-hook turns it into a per-call record that rides inside the blocks' ``joint_attention_kwargs`` (so gradient
checkpointing recomputes with the same values), each block's forward hook adds its residual on the target image
tokens. Arguments are found by the forward's signature, never by guessed positions (diffusers calls blocks
positionally under gradient checkpointing, and its parameter order changed between releases). A forward given a
condition that no block received raises instead of leaving the adapter silently inert.
"""
from __future__ import annotations

import inspect
from math import prod
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .errors import DependencyError, IncompatibleAdapterError, InputError

if TYPE_CHECKING:
    from .adapter import IdCondition, IdGlowAdapter

__all__ = ["KWARG", "MIN_DIFFUSERS", "AttachedAdapter", "check_diffusers_version"]

KWARG = "idglow"        # the key callers put in attention_kwargs
_PRIVATE = "_idglow"    # what travels from the transformer pre-hook to the blocks
# The first diffusers release whose QwenImageTransformer2DModel has zero_cond_t (Qwen-Image-Edit-2511) and passes
# attention_kwargs to the blocks also under gradient checkpointing (0.36 drops them there: the adapter would add
# exactly 0 and get 0 gradient). Keep in step with requirements.txt.
MIN_DIFFUSERS = "0.37.0"


def check_diffusers_version() -> None:
    """Raise :class:`DependencyError` for a diffusers older than :data:`MIN_DIFFUSERS`."""
    import diffusers
    from packaging.version import Version

    if Version(diffusers.__version__) < Version(MIN_DIFFUSERS):
        raise DependencyError(f"diffusers {diffusers.__version__} is too old for the IdGlow adapter: before "
                              f"{MIN_DIFFUSERS} the Qwen-Image DiT has no zero_cond_t (Qwen-Image-Edit-2511) and "
                              f"its gradient-checkpointed blocks get no attention kwargs, so the adapter would add "
                              f"nothing. Run: pip install -U 'diffusers>={MIN_DIFFUSERS}'.")



class _Call:
    """Per-forward state: rides inside the blocks' attention kwargs (checkpoint-safe)."""

    __slots__ = ("cond", "scale", "n_target", "active", "consumed")

    def __init__(self, cond: IdCondition, scale: torch.Tensor, n_target: int | None):
        self.cond, self.scale, self.n_target = cond, scale, n_target
        # one device sync per DiT call, not per block; training computes the residual even at scale 0
        self.active = cond.compute_always or bool((scale != 0).any())
        self.consumed = 0  # blocks that received this call (the inert-adapter guard checks it)


_SIGNATURES: dict[type, list[str]] = {}


def _param_names(module: nn.Module) -> list[str]:
    """Names of ``module.forward``'s parameters in order (what a hook's positional ``args`` are)."""
    names = _SIGNATURES.get(type(module))
    if names is None:
        names = _SIGNATURES[type(module)] = list(inspect.signature(module.forward).parameters)
    return names


def _get_arg(module: nn.Module, args: tuple, kwargs: dict, name: str) -> tuple[Any, int | None]:
    """(value, position in ``args`` or None when keyword/absent) of ``module.forward``'s argument ``name``,
    located by the forward's signature (diffusers calls blocks positionally under gradient checkpointing)."""
    if name in kwargs:
        return kwargs[name], None
    names = _param_names(module)
    pos = names.index(name) if name in names else len(args)
    return (args[pos], pos) if pos < len(args) else (None, None)


def _set_arg(args: tuple, kwargs: dict, name: str, pos: int | None, value: Any) -> tuple[tuple, dict]:
    if pos is None:
        kwargs[name] = value
        return args, kwargs
    return args[:pos] + (value,) + args[pos + 1:], kwargs


class AttachedAdapter:
    """Hooks of one adapter on one transformer. Use as a context manager or call :meth:`detach`."""

    def __init__(self, adapter: IdGlowAdapter, transformer: nn.Module):
        hooks = transformer._forward_pre_hooks.values()
        if any(isinstance(getattr(h, "__self__", None), AttachedAdapter) for h in hooks):
            # the first adapter's pre-hook would take this one's condition and apply it with its own weights
            raise InputError("This transformer already has an IdGlow adapter attached. Detach it first "
                             "(handle.detach(), IdGlowTrainModule.detach_hooks(), or leave its `with attach(...)` "
                             "block), then attach the other one.")
        self.adapter, self.transformer = adapter, transformer
        self._pending: dict[int, _Call] = {}  # set by a block's pre-hook, consumed by its own forward hook
        self._call: _Call | None = None       # this forward's condition, checked after the forward
        self._handles = [transformer.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
                         transformer.register_forward_hook(self._model_hook, with_kwargs=True)]
        for i, blk in enumerate(transformer.transformer_blocks):
            self._handles.append(blk.register_forward_pre_hook(self._block_pre_hook(i), with_kwargs=True))
            self._handles.append(blk.register_forward_hook(self._block_hook(i), with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._pending, self._call = [], {}, None

    def __enter__(self) -> "AttachedAdapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _model_pre_hook(self, module, args, kwargs):
        self._call = None
        ak, pos = _get_arg(module, args, kwargs, "attention_kwargs")
        if not ak or KWARG not in ak:
            return None
        ak = dict(ak)
        cond = ak.pop(KWARG)
        from .adapter import IdCondition
        if not isinstance(cond, IdCondition):
            raise InputError(f"attention_kwargs['{KWARG}'] must be an IdCondition (adapter.condition(...)), "
                             f"got {type(cond).__name__}.")
        sigma = _get_arg(module, args, kwargs, "timestep")[0]  # = flow time t in [0, 1]
        shapes = _get_arg(module, args, kwargs, "img_shapes")[0]
        n_target = prod(shapes[0][0]) if shapes else None
        scale = cond.scale(sigma.reshape(-1))
        ak[_PRIVATE] = self._call = _Call(cond, scale, n_target)
        return _set_arg(args, kwargs, "attention_kwargs", pos, ak)

    def _model_hook(self, module, args, kwargs, output):
        call, self._call = self._call, None
        if call is not None and call.consumed == 0:
            import diffusers
            n_blocks = len(self.transformer.transformer_blocks)
            ckpt = ", gradient checkpointing on" if getattr(module, "gradient_checkpointing", False) else ""
            raise IncompatibleAdapterError(
                f"The DiT was given an IdGlow identity condition, but none of its {n_blocks} blocks received it "
                f"(diffusers {diffusers.__version__}{ckpt}): the adapter would add nothing and get no gradient. Use "
                f"diffusers >= {MIN_DIFFUSERS} (pip install -U 'diffusers>={MIN_DIFFUSERS}'), whose blocks get the "
                f"attention kwargs in every path.")
        return None

    def _block_pre_hook(self, index: int):
        def hook(module, args, kwargs):
            self._pending.pop(index, None)
            jak, pos = _get_arg(module, args, kwargs, "joint_attention_kwargs")
            if not jak or _PRIVATE not in jak:
                return None
            jak = dict(jak)
            call = self._pending[index] = jak.pop(_PRIVATE)
            call.consumed += 1
            return _set_arg(args, kwargs, "joint_attention_kwargs", pos, jak)
        return hook

    def _block_hook(self, index: int):
        def hook(module, args, kwargs, output):
            call = self._pending.pop(index, None)
            if call is None or not call.active:
                return output  # weight 0 / Omega(t) = 0: the block output is untouched
            txt, img = output  # QwenImageTransformerBlock returns (text stream, image stream)
            n = img.shape[1] if call.n_target is None else call.n_target
            c = call.cond
            res = self.adapter.block_residual(index, img[:, :n], c.tokens, c.mask, call.scale, c.token_weights)
            return txt, torch.cat([img[:, :n] + res, img[:, n:]], dim=1)
        return hook
