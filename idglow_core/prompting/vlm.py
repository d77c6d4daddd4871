"""Loading the prompt-enricher VLM (Qwen2.5-VL / Qwen3-VL through transformers) and its optional LoRA.

``trust_remote_code`` stays off: both families are native transformers classes. A model is found as a local
folder or, by repo id, in the Hugging Face cache (never downloaded here). Without torchvision the stock
processors cannot be built (transformers#43986), so the processor falls back to the PIL image backend.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import ConfigError, IncompatibleAdapterError, ModelFormatError, ModelNotFoundError

log = logging.getLogger("idglow")

__all__ = ["FAMILIES", "VLMBundle", "load_vlm", "apply_lora", "offline_processor_class", "resolve_dtype"]

# model_type in config.json -> processor class name in transformers
FAMILIES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
            "qwen2_vl": "Qwen2VLProcessor", "qwen3_vl_moe": "Qwen3VLProcessor"}
_DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


@dataclass
class VLMBundle:
    """A loaded prompt-enricher VLM: what the ``IDGLOW_VLM`` socket carries.

    model: a ``*ForConditionalGeneration`` in eval mode; processor: its chat/image processor;
    family: the config's ``model_type``; source: where it came from; lora: the applied LoRA folder, if any;
    load_device: where it was loaded to (a node may park it on the CPU between runs and move it back).
    """

    model: Any
    processor: Any
    family: str
    source: str
    lora: str | None = None
    load_device: str = "cpu"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def offline_processor_class(family: str) -> type:
    """The family's processor class, patched so that ``video_processor=None`` passes the type check.

    Image-only calls never touch the video processor, whose class needs torchvision.
    """
    import transformers

    base = getattr(transformers, FAMILIES[family])

    class OfflineProcessor(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    OfflineProcessor.__name__ = f"Offline{base.__name__}"
    return OfflineProcessor


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """'auto' | 'bf16' | 'fp16' | 'fp32' (or a torch.dtype) -> what ``from_pretrained(dtype=...)`` takes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise ConfigError(f"Unknown dtype '{dtype}'. Use one of {', '.join(_DTYPES)}.")
    return _DTYPES[str(dtype).lower()]


def _resolve_device(device: str) -> str:
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"Device '{device}' was requested but CUDA is not available in this PyTorch build. "
                          f"Use device 'cpu', or install a CUDA build of torch.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("Device 'mps' was requested but is not available. Use device 'cpu'.")
    return device


def _resolve_folder(path: str | os.PathLike) -> Path:
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if str(path).count("/") == 1 and not folder.exists():  # a repo id: look in the HF cache only
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), local_files_only=True))
        except Exception as exc:  # huggingface_hub raises several classes for a cache miss
            raise ModelNotFoundError(
                f"VLM '{path}' is neither a folder nor in the Hugging Face cache ({type(exc).__name__}). "
                f"Download it first, e.g. `huggingface-cli download {path}`, or pass the model folder.") from exc
    raise ModelNotFoundError(f"VLM folder not found: '{folder}'. Pass a folder holding config.json and the "
                             f"safetensors weights of a Qwen2.5-VL or Qwen3-VL model (e.g. ComfyUI's models/LLM).")


def _read_family(folder: Path) -> str:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"No config.json in '{folder}'. Point to the model folder itself (the one with "
                                 f"config.json and *.safetensors), not its parent.")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"'{config_file}' is not valid JSON ({exc}). Re-download the model.") from exc
    if model_type not in FAMILIES:
        raise ModelFormatError(f"'{folder}' holds a '{model_type}' model; the prompt enricher needs one of "
                               f"{', '.join(FAMILIES)} (Qwen2-VL, Qwen2.5-VL or Qwen3-VL, e.g. Qwen3-VL-8B-Instruct).")
    return model_type


def _load_processor(folder: Path, family: str):
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil

    try:
        return AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as exc:
        log.debug("AutoProcessor failed for %s (%s); building the PIL-backend processor", folder, exc)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            text = (folder / name).read_text(encoding="utf-8")
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    template = template or getattr(tokenizer, "chat_template", None)
    return offline_processor_class(family)(image_processor=image_processor, tokenizer=tokenizer,
                                           video_processor=None, chat_template=template)


def load_vlm(path: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str = "cpu",
             lora: str | os.PathLike | None = None) -> VLMBundle:
    """Load a Qwen2.5-VL / Qwen3-VL prompt enricher from a folder (or a repo id already in the HF cache).

    ``lora``: a PEFT LoRA folder written by ``train/prompt_dpo.py``; it is merged into the weights.
    Raises ModelNotFoundError / ModelFormatError / IncompatibleAdapterError / ConfigError with the fix.
    """
    from transformers import AutoModelForImageTextToText

    folder = _resolve_folder(path)
    family = _read_family(folder)
    torch_dtype, device = resolve_dtype(dtype), _resolve_device(device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=False)
    except OSError as exc:
        raise ModelNotFoundError(f"Cannot load the VLM weights from '{folder}' ({exc}). Check that the "
                                 f"*.safetensors files are complete.") from exc
    processor = _load_processor(folder, family)
    if lora is not None:
        model = apply_lora(model, lora)
    model = model.to(device).eval()
    log.info("Loaded %s VLM from %s (dtype %s, device %s%s)", family, folder, model.dtype, device,
             f", LoRA {lora}" if lora else "")
    return VLMBundle(model=model, processor=processor, family=family, source=str(folder),
                     lora=None if lora is None else str(lora), load_device=device)


def apply_lora(model, lora: str | os.PathLike):
    """Merge a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into ``model``; returns it.

    Every tensor in the file must land in the model, else IncompatibleAdapterError (never a silent no-op).
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(lora)
    weights, config_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if not (weights.is_file() and config_file.is_file()):
        raise ModelNotFoundError(f"LoRA folder '{folder}' must hold adapter_config.json and "
                                 f"adapter_model.safetensors (what train/prompt_dpo.py writes).")
    try:
        config = LoraConfig.from_pretrained(str(folder))
        state = load_file(str(weights))
    except Exception as exc:  # peft and safetensors raise many classes for a broken file
        raise ModelFormatError(f"Cannot read the LoRA in '{folder}' ({type(exc).__name__}: {exc}). "
                               f"Re-export it with train/prompt_dpo.py.") from exc
    record = folder / "idglow_prompt_dpo.yaml"  # written by train/prompt_dpo.py next to the weights
    if record.is_file():
        family = (yaml.safe_load(record.read_text(encoding="utf-8")) or {}).get("family")
        if family and family != getattr(model.config, "model_type", family):
            raise IncompatibleAdapterError(f"The LoRA in '{folder}' was trained on a {family} model, this VLM is "
                                           f"{model.config.model_type}. Use the base model the LoRA was trained on.")
    try:
        peft_model = get_peft_model(model, config)
        result = set_peft_model_state_dict(peft_model, state)
    except (ValueError, RuntimeError) as exc:
        raise IncompatibleAdapterError(f"The LoRA in '{folder}' does not fit this VLM ({exc}). Use the LoRA "
                                       f"trained on this base model.") from exc
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected or not state:
        raise IncompatibleAdapterError(f"{len(unexpected)} of {len(state)} LoRA tensors in '{folder}' match no "
                                       f"layer of this VLM (first: {unexpected[:2]}). Use the LoRA trained on "
                                       f"this base model.")
    return peft_model.merge_and_unload()
