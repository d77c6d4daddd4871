"""Final outputs of a run, in the formats the rest of IdGlow and diffusers load.

- ``idglow_adapter.safetensors``: :meth:`IdGlowAdapter.save` (nodes, ``IdGlowPipeline``).
- ``pytorch_lora_weights.safetensors`` (``run.train=lora``): diffusers LoRA format, keys
  ``transformer.<module>.lora_A.weight``; ``pipe.load_lora_weights(folder)`` and ComfyUI's LoRA loader read it.
- ``transformer/`` (``run.train=full``): ``save_pretrained`` safetensors shards + config, a drop-in
  replacement for the pipeline's ``transformer`` folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapter import IdGlowAdapter
from .models import IdGlowTrainModule

__all__ = ["ADAPTER_FILE", "LORA_FILE", "export_weights"]

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
        from diffusers import QwenImageEditPlusPipeline
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(module.transformer, state_dict=transformer_state)
        QwenImageEditPlusPipeline.save_lora_weights(str(folder), transformer_lora_layers=layers,
                                                    safe_serialization=True)
        written.append(folder / LORA_FILE)
    elif train == "full":
        _save_transformer(module, transformer_state, folder / "transformer")
        written.append(folder / "transformer")
    (folder / "outputs.json").write_text(json.dumps({"train": train, "files": [p.name for p in written],
                                                     **metadata}, indent=1), encoding="utf-8")
    return written
