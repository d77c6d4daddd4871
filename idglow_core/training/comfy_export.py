"""Trained DiT weights as one safetensors file that ComfyUI's Qwen-Image loader (UNETLoader) detects.

ComfyUI names the Qwen-Image DiT's tensors exactly as diffusers does (``img_in.weight``, ``txt_norm.weight``,
``transformer_blocks.N.attn.to_q.weight``, ...), and detects the family from ``txt_norm.weight``
(``comfy/model_detection.py``). Qwen-Image-Edit-2511 (diffusers ``zero_cond_t=true``: reference tokens
modulated at t = 0) is told apart by one extra, empty tensor ``__index_timestep_zero__``; without it ComfyUI
runs the references at the sampling t, i.e. a different model. So the file is the diffusers state dict, cast to
bf16 by default, plus that marker when the config has ``zero_cond_t``.

The writer streams: one tensor at a time goes from its source (an in-memory state dict, or the diffusers
``transformer/`` shards opened lazily) to disk, so converting a 20 B DiT needs about one tensor of RAM, not
38 GiB. Put the file in ``ComfyUI/models/diffusion_models`` and load it with "Load Diffusion Model".

    python train/to_comfyui.py runs/sft/final/transformer -o models/diffusion_models/idglow_dit.safetensors
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import ConfigError, ModelNotFoundError

__all__ = ["COMFY_DIT_FILE", "ZERO_COND_MARKER", "DTYPES", "write_safetensors", "save_comfyui_dit",
           "convert_transformer_folder"]

COMFY_DIT_FILE = "idglow_dit_comfyui.safetensors"
ZERO_COND_MARKER = "__index_timestep_zero__"  # ComfyUI 0.8's key for Qwen-Image-Edit-2511's zero_cond_t
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: str | os.PathLike, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                      load: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file tensor by tensor, atomically (temp file + rename).

    ``entries``: (name, shape, dtype) of every tensor, in file order; ``load(name)`` returns that tensor (it is
    called once per name, just before its bytes are written, and may read it from disk).
    """
    path = Path(path)
    header, offset = {}, 0
    for name, shape, dtype in entries:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape, dtype in entries:
                t = load(name).detach().to(device="cpu", dtype=dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ConfigError(f"Tensor '{name}' changed shape while writing ({tuple(t.shape)} != {shape}).")
                fh.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _target_dtype(tensor_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor_dtype.is_floating_point else tensor_dtype


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"ComfyUI export dtype must be one of {sorted(DTYPES)}, got '{dtype}'.")
    return DTYPES[dtype]


def _entries(shapes: Iterable[tuple[str, tuple[int, ...], torch.dtype]], config: dict,
             dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    entries = [(k, tuple(s), _target_dtype(d, dtype)) for k, s, d in sorted(shapes)]
    names = {e[0] for e in entries}
    if "txt_norm.weight" not in names or "img_in.weight" not in names:
        raise ConfigError("These weights are not a Qwen-Image DiT (no 'txt_norm.weight' / 'img_in.weight'): "
                          "ComfyUI could not detect them. Export the transformer of a run.train=full run.")
    if config.get("zero_cond_t"):
        entries.append((ZERO_COND_MARKER, (0,), dtype))
    return entries


def _metadata(config: dict, dtype: str) -> dict[str, str]:
    return {"format": "pt", "idglow": "dit", "dtype": dtype, "diffusers_config": json.dumps(config)}


def save_comfyui_dit(state: dict[str, torch.Tensor], config: dict, path: str | os.PathLike,
                     dtype: str = "bf16") -> Path:
    """Write a diffusers ``QwenImageTransformer2DModel`` state dict (``config``: its config dict) as one ComfyUI
    file; floating tensors are cast to ``dtype`` (bf16 | fp16 | fp32)."""
    target = _check_dtype(dtype)
    entries = _entries(((k, tuple(v.shape), v.dtype) for k, v in state.items()), config, target)
    empty = torch.zeros(0, dtype=target)
    return write_safetensors(path, entries, lambda k: empty if k == ZERO_COND_MARKER else state[k],
                             _metadata(config, dtype))


def convert_transformer_folder(folder: str | os.PathLike, path: str | os.PathLike, dtype: str = "bf16") -> Path:
    """A diffusers ``transformer/`` folder (config.json + safetensors shards) -> one ComfyUI file, reading one
    tensor at a time."""
    from safetensors import safe_open

    folder = Path(folder)
    shards = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not shards:
        raise ModelNotFoundError(f"'{folder}' is not a diffusers transformer folder (config.json + *.safetensors). "
                                 f"Point at <run>/final/transformer of a run.train=full run.")
    target = _check_dtype(dtype)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    where, shapes = {}, []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                shapes.append((k, tuple(sl.get_shape()), _TORCH_DTYPES[sl.get_dtype()]))
                where[k] = shard
    entries = _entries(shapes, config, target)
    handles: dict[Path, object] = {}

    def load(name: str) -> torch.Tensor:
        if name == ZERO_COND_MARKER:
            return torch.zeros(0, dtype=target)
        shard = where[name]
        if shard not in handles:
            handles[shard] = safe_open(str(shard), framework="pt")
        return handles[shard].get_tensor(name)

    return write_safetensors(path, entries, load, _metadata(config, dtype))
