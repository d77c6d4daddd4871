"""Final outputs of a run, in the formats the rest of IdGlow and diffusers load.

- ``idglow_adapter.safetensors``: :meth:`IdGlowAdapter.save` (nodes, ``IdGlowPipeline``).
- ``pytorch_lora_weights.safetensors`` (``run.train=lora``): diffusers LoRA format, keys
  ``transformer.<module>.lora_A.weight``; ``pipe.load_lora_weights(folder)`` and ComfyUI's LoRA loader
  (LoraLoaderModelOnly) read it. The LoRA's scale ``lora_alpha / rank`` is multiplied into ``lora_B``: the
  file holds no alpha, and every loader then assumes alpha = rank (scale 1), which reproduces the trained
  delta ``(alpha / rank) B A`` exactly. The metadata key ``idglow_lora`` records rank, alpha and that scale
  (:func:`read_lora_for_peft` undoes it to continue training with peft).
- ``transformer/`` (``run.train=full``): ``save_pretrained`` safetensors shards + config, a drop-in
  replacement for the pipeline's ``transformer`` folder, and ``idglow_dit_comfyui.safetensors``: the same DiT
  as one bf16 file in ComfyUI's Qwen-Image layout (``comfy_export``; UNETLoader / "Load Diffusion Model").
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..adapter import IdGlowAdapter
from ..errors import ConfigError
from .models import IdGlowTrainModule

__all__ = ["ADAPTER_FILE", "LORA_FILE", "export_weights", "save_lora", "read_lora_for_peft"]

ADAPTER_FILE = "idglow_adapter.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(prefix)}


def _save_transformer(module: IdGlowTrainModule, state: dict[str, torch.Tensor], folder: Path) -> None:
    """diffusers layout (config.json + safetensors shards + index) from a full state dict, so that it also
    works with the gathered state of an FSDP run."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    module.transformer.save_config(str(folder))
    split = split_torch_state_dict_into_shards(state, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                               max_shard_size="5GB")
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def save_lora(transformer: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> Path:
    """The peft LoRA (adapter ``default``) of ``transformer`` from its state dict ``state`` -> diffusers
    LoRA file at ``path``, with ``lora_alpha / r`` folded into every ``lora_B`` (see the module docstring)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = transformer.peft_config["default"]
    if config.rank_pattern or config.alpha_pattern or config.use_rslora:
        raise ConfigError("LoRA export supports one rank and alpha for every layer (no rank/alpha patterns, "
                          "no rsLoRA), as models.lora_config builds it.")
    scale = config.lora_alpha / config.r
    layers = get_peft_model_state_dict(transformer, state_dict=state)
    out = {f"transformer.{k}": (v.float() * scale).to(v.dtype) if ".lora_B." in k else v
           for k, v in layers.items()}
    meta = {"format": "pt", "idglow_lora": json.dumps({"rank": config.r, "alpha": config.lora_alpha,
                                                       "scale_in_lora_B": scale})}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in out.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_lora_for_peft(path: Path, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """An exported LoRA file as a peft state dict (no ``transformer.`` prefix) for a LoraConfig with ``rank``
    and ``alpha``: the folded scale is divided back out, so peft's ``alpha / rank`` gives the file's delta.
    Files without ``idglow_lora`` metadata (older exports) are returned as stored."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        state = {k.removeprefix("transformer."): fh.get_tensor(k) for k in fh.keys()}
    if "idglow_lora" in meta:
        undo = rank / alpha
        state = {k: (v.float() * undo).to(v.dtype) if ".lora_B." in k else v for k, v in state.items()}
    return state


def export_weights(module: IdGlowTrainModule, folder: Path, train: str, metadata: dict[str, str],
                   state: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write the trained weights into ``folder`` (already created); returns the files.

    ``state``: the module's full state dict (``accelerator.get_state_dict``: gathered under FSDP); default
    ``module.state_dict()``.
    """
    folder = Path(folder)
    state = module.state_dict() if state is None else state
    adapter = IdGlowAdapter(module.adapter.config)
    adapter.load_state_dict(_sub(state, "adapter."))
    written = [adapter.save(folder / ADAPTER_FILE, extra_metadata=metadata)]
    transformer_state = _sub(state, "transformer.")
    if train == "lora":
        written.append(save_lora(module.transformer, transformer_state, folder / LORA_FILE))
    elif train == "full":
        from .comfy_export import COMFY_DIT_FILE, save_comfyui_dit

        _save_transformer(module, transformer_state, folder / "transformer")
        written.append(folder / "transformer")
        written.append(save_comfyui_dit(transformer_state, dict(module.transformer.config), folder / COMFY_DIT_FILE))
    (folder / "outputs.json").write_text(json.dumps({"train": train, "files": [p.name for p in written],
                                                     **metadata}, indent=1), encoding="utf-8")
    return written
