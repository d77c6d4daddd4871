"""Badcase-driven preference alignment of the prompt enricher (paper §3.2): trl DPO on the VLM with a LoRA.

The reference policy is the same network with the LoRA switched off (trl does this when ``peft_config`` is
given and ``ref_model`` is None), so there is no second copy of the VLM. Images are part of every sample.
The result is a PEFT LoRA folder that ``load_vlm(..., lora=...)`` and the IdGlowVLMLoader node read.

    python train/prompt_dpo.py --config train/configs/prompt_dpo_tiny_cpu.yaml          # offline smoke run
    python train/prompt_dpo.py --config my.yaml --pairs data/pairs.jsonl --max_steps 500
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..errors import ConfigError, DependencyError
from .enricher import build_messages, to_pil_images
from .pairs import PreferencePair, read_pairs, write_synthetic_pairs
from .vlm import VLMBundle, load_vlm

log = logging.getLogger("idglow")

__all__ = ["PromptDPOConfig", "load_config", "build_dataset", "train_prompt_dpo"]


@dataclass
class PromptDPOConfig:
    """Settings of a prompt-DPO run (YAML keys = field names).

    model: a VLM folder / cached repo id, or 'tiny:qwen2_5_vl' / 'tiny:qwen3_vl' (random, offline; the base is
    saved to output_dir/base_model so the LoRA can be loaded later). pairs: a JSONL (see pairs.py) or
    'synthetic:N' (N generated pairs, for smoke runs). output_dir: the LoRA goes to output_dir/lora.
    """

    model: str = "tiny:qwen2_5_vl"
    pairs: str = "synthetic:8"
    output_dir: str = "runs/prompt_dpo"
    lora_r: int = 16            # rank 16 on attention projections: enough for phrasing, small file
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    beta: float = 0.1           # DPO temperature; trl's default
    learning_rate: float = 5e-6  # LoRA DPO on a 4-8 B VLM; raise for tiny models
    max_steps: int = 500
    batch_size: int = 1
    grad_accum: int = 8
    seed: int = 0
    dtype: str = "bf16"         # bf16 weights on GPU; fp32 on CPU
    device: str = "auto"        # auto = cuda if available else cpu
    max_image_pixels: int = 448 * 448
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    save_steps: int = 0         # 0 = only the final LoRA; >0 = resumable trainer checkpoints every N steps
    resume: bool = False        # continue from the newest checkpoint in output_dir/checkpoints ("latest" = true)
    overwrite: bool = False     # start again in a folder holding a prompt-DPO run (removes only its files)

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha", "max_steps", "batch_size", "grad_accum", "logging_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"'{name}' must be >= 1, got {getattr(self, name)}.")
        if not (self.beta > 0 and self.learning_rate > 0 and 0 <= self.lora_dropout < 1):
            raise ConfigError(f"Need beta > 0, learning_rate > 0 and 0 <= lora_dropout < 1; got {self.beta}, "
                              f"{self.learning_rate}, {self.lora_dropout}.")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got '{self.device}'.")
        if self.model.startswith("tiny:") and self.model[5:] not in ("qwen2_5_vl", "qwen3_vl"):
            raise ConfigError(f"Unknown tiny model '{self.model}'. Use tiny:qwen2_5_vl or tiny:qwen3_vl.")
        if not self.target_modules:
            raise ConfigError("target_modules is empty; name the Linear layers the LoRA adapts (e.g. q_proj).")


def load_config(path: str | os.PathLike | None = None, **overrides) -> PromptDPOConfig:
    """A config from a YAML file (optional) with keyword overrides on top; unknown keys are errors."""
    values = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"Cannot read config '{path}' ({exc}). Pass a YAML file of PromptDPOConfig "
                              f"keys.") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(PromptDPOConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"Unknown config key(s) {unknown}. Known keys: {', '.join(sorted(known))}.")
    return PromptDPOConfig(**{k: _coerce(k, v) for k, v in values.items()})


def _coerce(name: str, value):
    """YAML reads '1e-3' as a string and CLI flags may give ints for floats: convert to the field's type."""
    kind = {f.name: f.type for f in dataclasses.fields(PromptDPOConfig)}[name]
    try:
        if kind in ("int", "float", "str"):
            return {"int": int, "float": float, "str": str}[kind](value)
    except (TypeError, ValueError):
        raise ConfigError(f"Config key '{name}' must be {kind}, got {value!r}.") from None
    if name == "resume" and value == "latest":  # the other trainers' spelling
        return True
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"Config key '{name}' must be true or false, got {value!r}.")
    if kind == "list[str]":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise ConfigError(f"Config key '{name}' must be a list of names, got {value!r}.")
        return [str(v) for v in value]
    return value


def build_dataset(pairs: list[PreferencePair], max_image_pixels: int):
    """trl's conversational vision preference format: prompt/chosen/rejected messages + ``images``."""
    from datasets import Dataset

    rows = [{"images": _load(pair, max_image_pixels),
             "prompt": build_messages(pair.instruction, pair.task, len(pair.images)),
             "chosen": [{"role": "assistant", "content": pair.chosen}],
             "rejected": [{"role": "assistant", "content": pair.rejected}]} for pair in pairs]
    return Dataset.from_list(rows)


def _load(pair: PreferencePair, max_image_pixels: int):
    from ..images import load_image

    return to_pil_images([load_image(p) for p in pair.images], max_image_pixels)


def _device(config: PromptDPOConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def _load_model(config: PromptDPOConfig, out: Path) -> VLMBundle:
    device = _device(config)
    dtype = config.dtype if device != "cpu" else "fp32"  # bf16 matmuls on CPU are slow and lossy
    if config.model.startswith("tiny:"):
        from .testing import save_tiny_vlm

        base = save_tiny_vlm(out / "base_model", config.model[5:], seed=config.seed)
        return load_vlm(base, dtype=dtype, device=device)
    return load_vlm(config.model, dtype=dtype, device=device)


def _pairs(config: PromptDPOConfig, out: Path) -> list[PreferencePair]:
    if config.pairs.startswith("synthetic:"):
        return read_pairs(write_synthetic_pairs(out / "synthetic_pairs", n=int(config.pairs[10:]), seed=config.seed))
    return read_pairs(config.pairs)


RUN_ITEMS = ("lora", "checkpoints")  # what --overwrite removes (base_model/ and synthetic_pairs/ are rewritten)
TRAINER = "idglow-prompt-dpo"


def _check_output_dir(config: PromptDPOConfig, out: Path) -> list[Path]:
    """The output-folder rules of every IdGlow trainer (training/run_dir.py), before any work: a previous
    run needs ``resume`` or ``overwrite``, a folder IdGlow did not write is never touched. Returns what
    ``overwrite`` will remove once the pairs and the model loaded."""
    from ..training.run_dir import check_output_folder

    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    if config.resume:
        if not checkpoints:
            raise ConfigError(f"resume: no trainer checkpoint in '{out / 'checkpoints'}' (they are written when "
                              f"save_steps > 0). Start without --resume, or point --output-dir at that run.")
        return []
    finished = bool(checkpoints) or (out / "lora").exists()
    return check_output_folder(out, overwrite=config.overwrite, items=RUN_ITEMS, finished=finished, trainer=TRAINER)


def _claim_output_dir(out: Path, clear: list[Path]) -> None:
    from ..training.run_dir import write_marker

    for item in clear:
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
        log.info("--overwrite: removed %s", item)
    write_marker(out, TRAINER)


def _save_lora_atomic(model, final: Path, config: PromptDPOConfig, vlm: VLMBundle) -> Path:
    """Write the LoRA to a temporary folder, then swap it in; the config travels with the weights."""
    tmp, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    record = dataclasses.asdict(config) | {"base_model": vlm.source, "family": vlm.family}
    (tmp / "idglow_prompt_dpo.yaml").write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def train_prompt_dpo(config: PromptDPOConfig) -> tuple[Path, list[dict]]:
    """Run trl DPO with a LoRA on the enricher VLM; return (LoRA folder, trl's log history)."""
    try:
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer
    except ImportError as exc:
        raise DependencyError(f"Prompt DPO needs trl and peft ({exc}). Install them: pip install trl peft") from exc
    out = Path(config.output_dir)
    clear = _check_output_dir(config, out)  # the folder rules first, read-only
    pairs = _pairs(config, out)  # validated before the model is loaded
    torch.manual_seed(config.seed)
    vlm = _load_model(config, out)
    _claim_output_dir(out, clear)  # every check passed: now --overwrite removes the previous run's files
    vlm.model.train()
    device = _device(config)
    args = DPOConfig(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_steps=config.max_steps,
        learning_rate=config.learning_rate, beta=config.beta, logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or 500,
        report_to=[], use_cpu=device == "cpu", bf16=device != "cpu" and config.dtype == "bf16",
        gradient_checkpointing=config.gradient_checkpointing, max_length=None, seed=config.seed,
        dataloader_num_workers=0, remove_unused_columns=False)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=vlm.model, args=args, train_dataset=build_dataset(pairs, config.max_image_pixels),
                         processing_class=vlm.processor, peft_config=lora)
    log.info("Prompt DPO: %d pairs, %d steps, LoRA r=%d on %s", len(pairs), config.max_steps, config.lora_r,
             ", ".join(config.target_modules))
    trainer.train(resume_from_checkpoint=True if config.resume else None)
    final = _save_lora_atomic(trainer.model, out / "lora", config, vlm)
    log.info("Prompt DPO: LoRA written to %s", final)
    return final, list(trainer.state.log_history)
