"""Training configuration: documented dataclasses, a YAML file, flag overrides.

A config file has one mapping per section (``model``, ``data``, ``loss``, ``optim``, ``run``); every key is a
field below. Overrides are ``section.key=value`` strings (``--set loss.id_weight=0``), parsed as YAML scalars.

    cfg = load_config("train/configs/tiny_cpu.yaml", overrides=["optim.max_steps=3"])
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import ConfigError
from ..yamlfile import read_yaml_mapping
from ..losses import TIMESTEP_SCHEMES
from ..schedules import TASK_SCHEDULES, Schedule

__all__ = ["ModelConfig", "DataConfig", "LossConfig", "OptimConfig", "RunConfig", "TrainConfig",
           "load_config", "apply_overrides", "config_to_dict", "config_from_dict", "TRAIN_MODES"]

TRAIN_MODES = ("adapter", "lora", "full")
INJECTIONS = ("schedule", "constant")  # loss.injection
TASKS = tuple(TASK_SCHEDULES)  # Algorithm 1: the task picks Omega (Eq. 4 group fusion, Eq. 5 age)


@dataclass
class ModelConfig:
    """What to build. ``tiny=True`` builds random tiny models from configs (offline tests, tiny_cpu.yaml)."""

    tiny: bool = False
    pretrained: str = ""  # diffusers folder of Qwen-Image-Edit-2511 (transformer, vae, text_encoder, ...)
    init_adapter: str = ""  # optional adapter .safetensors to start from (IdGlowAdapter.load)
    tokens_per_id: int = 4  # N tokens per identity from the multi-ID encoder
    max_ids: int = 4  # K, the most identities one sample may carry
    face_backend: str = "auto"  # reference faces for ID tokens: auto | insightface | dlib
    face_model_dir: str = ""  # insightface folder holding buffalo_l ("" = $IDGLOW_INSIGHTFACE_DIR / ~/.insightface)
    arcface_onnx: str = ""  # w600k_r50.onnx for the ID loss's torch ArcFace; "" = the analyzer's; "tiny"
    lora_rank: int = 16  # used when run.train == "lora"
    lora_alpha: int = 16

    def __post_init__(self):
        if not self.tiny and not self.pretrained:
            raise ConfigError("model.pretrained is empty and model.tiny is false. Point model.pretrained at a "
                              "diffusers Qwen-Image-Edit-2511 folder, or set model.tiny=true for a smoke run.")
        if self.tokens_per_id < 1 or self.max_ids < 1 or self.lora_rank < 1:
            raise ConfigError(f"model.tokens_per_id ({self.tokens_per_id}), model.max_ids ({self.max_ids}) and "
                              f"model.lora_rank ({self.lora_rank}) must be >= 1.")


@dataclass
class DataConfig:
    """Training data: a JSONL manifest, or a synthetic set built on the fly (tiny runs)."""

    manifest: str = ""  # {"target": ..., "refs": [...], "prompt": ..., "task": "group|age"} per line
    synthetic: int = 0  # > 0: build this many synthetic samples in <output>/synthetic and train on them
    resolution: int = 1024  # target area = resolution^2 pixels (aspect kept, sides multiples of 32)
    ref_area: int = 0  # reference area for the VAE in pixels; 0 = the pipeline's 1024 * 1024
    condition_area: int = 0  # reference area for the VLM prompt encoder; 0 = the pipeline's 384 * 384
    synthetic_photos: list = field(default_factory=list)  # portraits for data.synthetic; [] = tests/data
    cache_dir: str = ""  # encodings on disk (bf16 safetensors, loaded lazily); "" = <run.output_dir>/cache
    batch_size: int = 1  # per process; samples in a batch must share k and image sizes

    def __post_init__(self):
        if not self.manifest and self.synthetic <= 0:
            raise ConfigError("No training data: set data.manifest to a JSONL file, or data.synthetic to a "
                              "number of synthetic samples (smoke runs only).")
        if self.resolution % 32 or self.resolution < 32:
            raise ConfigError(f"data.resolution must be a positive multiple of 32, got {self.resolution}.")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}.")


@dataclass
class LossConfig:
    """Eq. 1: flow loss + omega(t) * id_weight * L_ID; timestep sampling; the adapter's injection strength.

    Each sample uses the Omega of its own manifest ``task`` (``schedule`` overrides it for every sample), both
    as its ID-loss weight and, with ``injection=schedule``, as the strength its ID residual is injected with
    (``Omega(t) * residual``, as IdGlowPipeline and IdGlow Apply deploy it). ``injection=constant`` injects at
    strength 1 at every t (what trainers did before; the adapter then runs weaker than trained at inference).
    """

    task: str = "group"  # synthetic data's task and the adapter's default schedule (manifest lines carry their own)
    schedule: str = ""  # overrides the tasks': "anneal(tau=0.2)", "gate", "constant" (schedules.py)
    injection: str = "schedule"  # schedule: inject Omega(t) * residual as deployed | constant: strength 1
    id_weight: float = 0.05  # lambda_base; 0 = the "w/o ID loss" ablation
    missing_face_value: float = 1.0  # L_ID per reference with no face in the estimate (facesim.id_loss)
    timestep_scheme: str = "uniform"  # uniform (Algorithm 1) | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: float = 1.0  # t' = s t / (1 + (s-1) t); ~2.0 matches Qwen-Image at 1024^2
    id_decode: str = "full"  # full: decode the whole estimate with grad | crop: with grad only each face's window
    id_crop_margin: int = 4  # id_decode=crop: latent cells added around each face's crop region (8 px each at x8)

    @property
    def omega(self) -> Schedule:
        """The ID-loss schedule Omega(t): ``schedule`` if set, else the task's preset (Algorithm 1 l. 8-12)."""
        return self.omega_for(self.task)

    def omega_for(self, task: str) -> Schedule:
        """Omega(t) of a sample of ``task``: ``schedule`` if set, else that task's preset (Eq. 4 / Eq. 5)."""
        return Schedule.parse(self.schedule) if self.schedule else TASK_SCHEDULES[task]

    def injection_for(self, task: str) -> Schedule:
        """The injection strength over t that a sample of ``task`` is trained with."""
        return self.omega_for(task) if self.injection == "schedule" else Schedule("constant")

    def omega_per_sample(self, tasks: list[str] | None, t: torch.Tensor) -> torch.Tensor:
        """``[B]`` Omega_{task_i}(t_i) (float32). ``tasks`` None: every sample has ``task``."""
        return _per_sample(self.omega_for, tasks or [self.task] * len(t), t)

    def injection_scale(self, tasks: list[str] | None, t: torch.Tensor) -> torch.Tensor:
        """``[B]`` injection strength of each sample at its t (float32): Omega_{task_i}(t_i), or 1."""
        return _per_sample(self.injection_for, tasks or [self.task] * len(t), t)

    def train_injection(self, tasks: list[str]) -> dict[str, str]:
        """``{task: schedule}`` metadata for the adapter file (``"*"`` = every task, for ``constant``)."""
        if self.injection == "constant":
            return {"*": Schedule("constant").to_str()}
        return {task: self.injection_for(task).to_str() for task in sorted(set(tasks) or {self.task})}

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"loss.task must be one of {TASKS}, got '{self.task}'.")
        if self.timestep_scheme not in TIMESTEP_SCHEMES:
            raise ConfigError(f"loss.timestep_scheme must be one of {TIMESTEP_SCHEMES}, got '{self.timestep_scheme}'.")
        values = (self.id_weight, self.timestep_shift, self.missing_face_value, self.logit_mean, self.logit_std)
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"loss.id_weight, timestep_shift, missing_face_value, logit_mean and logit_std must "
                              f"be finite numbers; got {list(values)}.")
        if self.id_weight < 0 or self.timestep_shift <= 0 or self.missing_face_value < 0:
            raise ConfigError(f"Need loss.id_weight >= 0 (got {self.id_weight}), loss.timestep_shift > 0 (got "
                              f"{self.timestep_shift}) and loss.missing_face_value >= 0.")
        if self.id_decode not in ("full", "crop") or self.id_crop_margin < 0:
            raise ConfigError(f"loss.id_decode must be 'full' or 'crop' (got '{self.id_decode}') and "
                              f"loss.id_crop_margin >= 0 latent cells (got {self.id_crop_margin}).")
        if self.injection not in INJECTIONS:
            raise ConfigError(f"loss.injection must be one of {INJECTIONS}, got '{self.injection}'.")
        _ = self.omega  # parse the schedule now (ConfigError on a bad name or parameter)
        if self.injection == "schedule" and self.omega.name == "none":
            raise ConfigError("loss.schedule=none with loss.injection=schedule injects nothing at any t: the adapter "
                              "would never train. Use loss.id_weight=0 for the 'w/o ID loss' ablation instead.")


@dataclass
class OptimConfig:
    """AdamW on the trainable parameters, constant LR after a linear warm-up."""

    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    max_steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 = no clipping
    ema_decay: float = 0.0  # 0 = no EMA; else e.g. 0.999 (the exported weights are then the EMA)
    skip_nonfinite: int = 0  # non-finite loss/gradient: 0 = stop at once; N = skip up to N such steps in a row

    def __post_init__(self):
        try:
            self.betas = tuple(float(b) for b in self.betas)
        except (TypeError, ValueError):
            raise ConfigError(f"optim.betas must be two numbers, e.g. [0.9, 0.999]; got {self.betas!r}.") from None
        if not (math.isfinite(self.lr) and self.lr > 0) or self.max_steps < 1 or self.grad_accum < 1 \
                or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"Need a finite optim.lr > 0, optim.max_steps >= 1, optim.grad_accum >= 1 and "
                              f"0 <= optim.ema_decay < 1; got {self.lr}, {self.max_steps}, {self.grad_accum}, "
                              f"{self.ema_decay}.")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two values in [0, 1) (AdamW), got {list(self.betas)}.")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)) or \
                not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(f"Need a finite optim.weight_decay >= 0 and optim.max_grad_norm >= 0 (0 = no "
                              f"clipping); got {self.weight_decay}, {self.max_grad_norm}.")
        if self.warmup_steps < 0 or self.skip_nonfinite < 0:
            raise ConfigError(f"Need optim.warmup_steps >= 0 and optim.skip_nonfinite >= 0; got "
                              f"{self.warmup_steps}, {self.skip_nonfinite}.")


@dataclass
class RunConfig:
    """Output folder, precision, checkpoints, logging."""

    output_dir: str = "runs/sft"
    train: str = "adapter"  # adapter | lora (adapter + LoRA on the DiT) | full (adapter + whole DiT)
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2  # newest N kept
    log_every: int = 1
    validate_every: int = 0  # optimizer steps between validation FaceSim runs; 0 = never
    validate_samples: int = 2  # first N training samples, sampled from fixed noise
    validate_steps: int = 8  # Euler steps per validation sample
    tensorboard: bool = True
    overwrite: bool = False  # allow writing into a non-empty output_dir that is not being resumed
    resume: str = ""  # "" | latest | path to a checkpoint folder
    allow_config_change: bool = False  # resume even though data/model/loss/seed differ from the checkpoint's

    def __post_init__(self):
        if self.train not in TRAIN_MODES:
            raise ConfigError(f"run.train must be one of {TRAIN_MODES}, got '{self.train}'.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"run.mixed_precision must be no, bf16 or fp16, got '{self.mixed_precision}'.")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ConfigError("Need run.checkpoint_every >= 0, run.keep_checkpoints >= 1, run.log_every >= 1.")


@dataclass
class TrainConfig:
    """The whole run; checkpoints carry it as JSON (config.json)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(tiny=True))
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic=4))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "optim": OptimConfig,
                  "run": RunConfig}


def _per_sample(schedule_of, tasks: list[str], t: torch.Tensor) -> torch.Tensor:
    if len(tasks) != len(t):
        raise ConfigError(f"{len(tasks)} tasks for {len(t)} samples: the batch's 'task' list must have one entry "
                          f"per sample.")
    t = t.detach().float()
    out = torch.empty_like(t)
    for task in set(tasks):
        idx = torch.tensor([i for i, k in enumerate(tasks) if k == task], device=t.device)
        out[idx] = schedule_of(task)(t[idx]).float()
    return out


def coerce_value(where: str, kind: str, value: Any) -> Any:
    """YAML reads ``5e-5`` as a string and ``1`` as an int: convert to the field's declared type."""
    try:
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "str":
            return "" if value is None else str(value)
        if kind not in ("float", "int", "bool"):
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{where} expects {kind}, got {value!r}.")


def _build(section: str, values: dict[str, Any]):
    cls = _SECTION_TYPES[section]
    kinds = {f.name: str(f.type) for f in fields(cls)}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in section '{section}'. Known keys: {sorted(kinds)}.")
    values = {k: coerce_value(f"{section}.{k}", kinds[k], v) for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"Bad values in section '{section}': {exc}") from exc


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from nested dicts; unknown sections or keys raise :class:`ConfigError`."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"A config must be a mapping of sections, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(_SECTION_TYPES))
    if unknown:
        raise ConfigError(f"Unknown config section(s) {unknown}. Use {sorted(_SECTION_TYPES)}.")
    return TrainConfig(**{name: _build(name, dict(raw.get(name) or {})) for name in _SECTION_TYPES})


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (JSON/YAML-ready) of ``cfg``."""
    out = dataclasses.asdict(cfg)
    out["optim"]["betas"] = list(out["optim"]["betas"])
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as YAML scalars)."""
    raw = {k: dict(v or {}) for k, v in (raw or {}).items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"Override '{item}' is not of the form section.key=value (e.g. loss.id_weight=0).")
        raw.setdefault(section, {})[name] = yaml.safe_load(value) if value.strip() else ""
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    raw = read_yaml_mapping(path, "Config", "train/configs/")
    return config_from_dict(apply_overrides(raw, overrides or []))
