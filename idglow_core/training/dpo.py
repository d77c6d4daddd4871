"""Fine-grained group-level DPO (paper §3.4, Eq. 6-7) on the shared training loop.

Per micro-step, for pairs (chosen ``z_w``, rejected ``z_l``) with the same references and prompt::

    t, eps ~ one draw per pair, shared by chosen and rejected
    v_ref  = network with the IdGlow adapter and the LoRA switched off   (no_grad; no second model copy)
    v      = network as trained                                          (with grad)
    Delta  = ||v - v*||^2 - ||v_ref - v*||^2,  v* = eps - z0             (Eq. 6)
    L      = -log sigmoid(-beta/2 (alpha Delta_w - Delta_l) + m) + lambda_SFT ||v_w - v*_w||^2   (Eq. 7)

Reference policy. The reference is the frozen base: the DiT with the adapter contributing exactly nothing
(injection strength Omega = 0, so its hooks leave every block output untouched) and peft's LoRA disabled.
:func:`reference_policy` does this in a try/finally and restores every ``requires_grad`` flag afterwards,
also when the forward raises (peft's disable/enable toggles them). ``run.train=full`` is refused: a fully
fine-tuned DiT has no "off" switch, and a frozen second copy of a 20 B model is what this design avoids;
run DPO with ``run.train=lora`` (or ``adapter``) on top of the SFT result instead. Consequence, by design
(DESIGN.md): when DPO starts from SFT weights the reference is the base, not the SFT start, so the first loss
is not log 2 and the rewards measure the policy against the base model. A reference equal to the SFT start
would need a frozen copy of the (small) adapter/LoRA tensors; that is not implemented.

Config: the SFT sections plus ``dpo:`` (:class:`DPOConfig`). From ``loss`` only the timestep sampling
(``timestep_scheme``, ``logit_mean/std``, ``timestep_shift``) and ``task`` apply; ``id_weight``/``schedule`` are
SFT-only. Checkpoints, resume, accelerate and the exported files are the SFT trainer's (``loop.run_loop``).

Starting point (``dpo.init_from``): an SFT output folder (``<run>/final`` or ``<run>``) holding
``idglow_adapter.safetensors`` and optionally ``pytorch_lora_weights.safetensors``, a checkpoint folder
(``<run>/checkpoints/step-N``; its EMA weights when present), or one adapter ``.safetensors`` file. A LoRA
from SFT keeps training (``run.train=lora``); the reference is then the base model without it.

    from idglow_core.training.dpo import load_dpo_config, run_dpo
    result = run_dpo(load_dpo_config("train/configs/dpo_tiny_cpu.yaml"))
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn as nn
from accelerate.utils import set_seed

from ..errors import ConfigError, ModelFormatError, ModelNotFoundError
from ..yamlfile import read_yaml_mapping
from ..losses import add_noise, per_sample_mse, velocity_target, weighted_margin_dpo_loss
from ..schedules import Schedule
from .config import LossConfig, TrainConfig, coerce_value, apply_overrides, config_from_dict, config_to_dict
from .loop import LoopParts, LoopResult, StepOutput, check_run, claim, make_accelerator, run_loop
from .sft import draw_t_and_noise

__all__ = ["DPOConfig", "DPORunConfig", "load_dpo_config", "dpo_config_to_dict", "reference_policy", "DPOStep",
           "InitWeights", "find_init_weights", "load_init_weights", "run_dpo"]

log = logging.getLogger("idglow")


@dataclass
class DPOConfig:
    """The ``dpo:`` section. ``alpha=1, margin=0, sft_weight=0`` is plain Diffusion-DPO (Eq. 7)."""

    # Diffusion-DPO uses 5000 on eps-MSE (SD1.5/SDXL). Velocity errors (v* = eps - z0) have a different, t-
    # dependent scale, so 2500 is a starting point, not a derived value: tune it per dataset while watching
    # rewards/margins and implicit_acc.
    beta: float = 2500.0
    alpha: float = 1.0  # asymmetric weight on the chosen pair's Delta (Eq. 7)
    margin: float = 0.0  # additive margin m >= 0 (Eq. 7)
    sft_weight: float = 0.0  # lambda_SFT: flow loss on the chosen sample (Eq. 7)
    init_from: str = ""  # SFT output folder, checkpoint folder or adapter file; "" = model.init_adapter/fresh

    def __post_init__(self):
        values = (self.beta, self.alpha, self.margin, self.sft_weight)
        if not all(math.isfinite(v) for v in values) or \
                not (self.beta > 0 and self.alpha > 0 and self.margin >= 0 and self.sft_weight >= 0):
            raise ConfigError(f"DPO needs dpo.beta > 0, dpo.alpha > 0, dpo.margin >= 0 and dpo.sft_weight >= 0 "
                              f"(Eq. 7); got {self.beta}, {self.alpha}, {self.margin}, {self.sft_weight}.")


@dataclass
class DPORunConfig:
    """A DPO run: the shared :class:`TrainConfig` (model, data, loss timesteps, optim, run) + ``dpo``."""

    train: TrainConfig
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self):
        if self.train.run.train == "full":
            raise ConfigError("DPO with run.train=full is not supported: the reference policy is the same network "
                              "with the trainable part switched off, and a fully fine-tuned DiT has no off switch "
                              "(a frozen second copy would double memory). Use run.train=lora or adapter.")
        if self.dpo.init_from and self.train.model.init_adapter:
            raise ConfigError("Both dpo.init_from and model.init_adapter are set. Keep one: dpo.init_from for an "
                              "SFT output or checkpoint folder, model.init_adapter for a single adapter file.")


def load_dpo_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DPORunConfig:
    """Read a YAML config with the usual sections plus ``dpo:`` and apply ``section.key=value`` overrides.
    ``run.output_dir`` defaults to ``runs/dpo``."""
    raw = apply_overrides(read_yaml_mapping(path, "Config", "train/configs/dpo_*.yaml"), overrides or [])
    dpo_raw = dict(raw.pop("dpo", None) or {})
    raw.setdefault("run", {}).setdefault("output_dir", "runs/dpo")
    kinds = {f.name: str(f.type) for f in fields(DPOConfig)}
    unknown = sorted(set(dpo_raw) - set(kinds))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in section 'dpo'. Known keys: {sorted(kinds)}.")
    dpo = DPOConfig(**{k: coerce_value(f"dpo.{k}", kinds[k], v) for k, v in dpo_raw.items()})
    return DPORunConfig(train=config_from_dict(raw), dpo=dpo)


def dpo_config_to_dict(cfg: DPORunConfig) -> dict[str, Any]:
    """Plain nested dict with every section, ``dpo`` included (what ``config.yaml`` of a DPO run holds)."""
    return {**config_to_dict(cfg.train), "dpo": dataclasses.asdict(cfg.dpo)}


# ---------------------------------------------------------------------------------------- reference policy
def _train_module(module: nn.Module) -> nn.Module:
    """The IdGlowTrainModule inside DDP / accelerate / test wrappers (each exposes ``.module``)."""
    from .models import IdGlowTrainModule

    inner = module
    while not isinstance(inner, IdGlowTrainModule) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not isinstance(inner, IdGlowTrainModule) or not hasattr(inner, "injection"):
        raise ConfigError(f"reference_policy needs an IdGlowTrainModule (possibly wrapped), got "
                          f"{type(module).__name__}. Build it with training.models.build_train_module.")
    return inner


@contextlib.contextmanager
def reference_policy(module: nn.Module) -> Iterator[nn.Module]:
    """Inside: ``module`` predicts as the frozen base (adapter adds exactly 0, LoRA disabled). On exit, also
    after an exception: the adapter's injection, the LoRA and every parameter's ``requires_grad`` are back.

    Use under ``torch.no_grad()`` and never call ``backward()`` inside (the LoRA is off there)."""
    inner = _train_module(module)
    flags = {name: p.requires_grad for name, p in inner.named_parameters()}
    schedule = inner.injection
    has_lora = bool(getattr(inner.transformer, "_hf_peft_config_loaded", False))
    inner.injection = Schedule("none")  # Omega = 0: the block hooks return the block output untouched
    try:
        if has_lora:
            inner.transformer.disable_adapters()  # peft: also sets requires_grad=False on the LoRA
        yield module
    finally:
        inner.injection = schedule
        if has_lora:
            inner.transformer.enable_adapters()
        for name, p in inner.named_parameters():
            p.requires_grad_(flags[name])


# ---------------------------------------------------------------------------------------- the step
def _twice(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` -> ``[2B, ...]``: the same conditioning for the chosen and the rejected half."""
    return torch.cat([x, x])


class DPOStep:
    """One DPO micro-step: ``(module, batch, generator) -> StepOutput`` for :func:`run_loop`.

    ``reference``: context manager factory that turns ``module`` into the reference policy (injectable for
    tests). The batch is :func:`~idglow_core.training.dpo_data.collate_pairs` output.
    """

    def __init__(self, loss: LossConfig, dpo: DPOConfig,
                 reference: Callable[[nn.Module], ContextManager] = reference_policy):
        self.loss, self.dpo, self.reference = loss, dpo, reference

    def __call__(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        device = next(module.parameters()).device
        z_w, z_l = batch["latents"].to(device), batch["latents_rejected"].to(device)  # [B, C, 1, h, w] each
        b = z_w.shape[0]
        t, eps = draw_t_and_noise(self.loss, z_w, generator)                        # one t and one noise per pair ...
        t2, eps2 = _twice(t), _twice(eps)                          # ... shared by chosen and rejected
        z0 = torch.cat([z_w, z_l])                                 # [2B, ...]: chosen first, then rejected
        z_t = add_noise(z0, eps2, t2)                              # z_t = (1 - t) z0 + t eps
        target = velocity_target(z0, eps2)                         # v* = eps - z0 (Eq. 6)
        args = (z_t, t2, [_twice(r.to(device)) for r in batch["ref_latents"]],
                _twice(batch["prompt_embeds"].to(device)), _twice(batch["prompt_mask"].to(device)),
                _twice(batch["id_embeds"].to(device)), _twice(batch["id_mask"].to(device)))
        with torch.no_grad(), self.reference(module):              # reference first: nothing interleaves
            ref_err = per_sample_mse(module(*args), target)        # ||v_ref - v*||^2, [2B]
        err = per_sample_mse(module(*args), target)                # ||v_theta - v*||^2, [2B]
        d = self.dpo
        loss, metrics = weighted_margin_dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], beta=d.beta,
                                                 alpha=d.alpha, margin=d.margin, sft_weight=d.sft_weight)  # Eq. 6-7
        logs: dict[str, Any] = {"loss/dpo": loss.item(), **metrics,
                                "mse/chosen": err[:b].mean().item(), "mse/rejected": err[b:].mean().item(),
                                "mse_ref/chosen": ref_err[:b].mean().item(),
                                "mse_ref/rejected": ref_err[b:].mean().item()}
        return StepOutput(loss=loss, logs=logs)


# ---------------------------------------------------------------------------------------- starting point
@dataclass
class InitWeights:
    """What ``dpo.init_from`` points at: an adapter file, a diffusers LoRA file, or a checkpoint's tensors."""

    adapter: Path | None = None
    lora: Path | None = None
    trainable: Path | None = None


def find_init_weights(path: str | Path) -> InitWeights:
    """Resolve an SFT output folder (``<run>`` or ``<run>/final``), a checkpoint folder or an adapter file."""
    from .export import ADAPTER_FILE, LORA_FILE

    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return InitWeights(adapter=p)
    if p.is_dir() and (p / "trainable.safetensors").is_file():
        ema = p / "ema.safetensors"  # what the SFT export used, when EMA was on
        return InitWeights(trainable=ema if ema.is_file() else p / "trainable.safetensors")
    if p.is_dir() and (p / "final").is_dir():
        p = p / "final"
    adapter, lora = p / ADAPTER_FILE, p / LORA_FILE
    if p.is_dir() and (adapter.is_file() or lora.is_file()):
        return InitWeights(adapter=adapter if adapter.is_file() else None, lora=lora if lora.is_file() else None)
    raise ModelNotFoundError(f"dpo.init_from='{path}' holds no SFT weights. Point it at an SFT run folder, its "
                             f"'final' folder ({ADAPTER_FILE} [+ {LORA_FILE}]), a 'checkpoints/step-N' folder, "
                             f"or an adapter .safetensors file.")


def _load_lora(module: nn.Module, path: Path) -> None:
    from peft import set_peft_model_state_dict

    from .export import read_lora_for_peft

    lora = module.transformer.peft_config["default"]
    state = read_lora_for_peft(path, lora.r, lora.lora_alpha)  # the export folds alpha / rank into lora_B
    try:
        result = set_peft_model_state_dict(module.transformer, state, adapter_name="default")
    except RuntimeError as exc:  # size mismatch: another rank
        raise ConfigError(f"The LoRA in '{path}' does not fit this run's LoRA ({str(exc)[:300]}). Set "
                          f"model.lora_rank/lora_alpha to the SFT run's values.") from None
    if result.unexpected_keys:
        raise ModelFormatError(f"'{path}' has {len(result.unexpected_keys)} LoRA tensors this model lacks (e.g. "
                               f"{result.unexpected_keys[:3]}): it was trained for another model or targets.")
    log.info("DPO starts from the LoRA in %s", path)


def load_init_weights(module: nn.Module, init: InitWeights, train_mode: str) -> None:
    """Load the LoRA or checkpoint tensors of ``init`` into a built train module (the adapter file is
    loaded by ``build_train_module`` through ``model.init_adapter``)."""
    if init.lora is not None:
        if train_mode != "lora":
            raise ConfigError(f"dpo.init_from has a LoRA ({init.lora}) but run.train={train_mode}: it would be "
                              f"dropped. Use run.train=lora (the LoRA keeps training; the reference is the base).")
        _load_lora(module, init.lora)
    if init.trainable is not None:
        from safetensors.torch import load_file

        state = load_file(str(init.trainable))
        own = {k: p for k, p in module.named_parameters() if p.requires_grad}
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ModelFormatError(f"Checkpoint '{init.trainable}' does not match this run (missing {missing[:3]}, "
                                   f"unexpected {extra[:3]}): set run.train and model.* as in the SFT run.")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k].to(p.dtype))
        log.info("DPO starts from the checkpoint tensors in %s", init.trainable)


# ---------------------------------------------------------------------------------------- the trainer
def _start_files(cfg: DPORunConfig) -> dict[str, str]:
    """The start-weight files of a run, by the config key that names them (read in full before any model is
    built: a damaged dpo.init_from or LoRA is refused up front)."""
    files = {"model.init_adapter": cfg.train.model.init_adapter}
    if cfg.dpo.init_from:
        init = find_init_weights(cfg.dpo.init_from)
        files.update({f"dpo.init_from ({kind})": str(path) for kind, path in
                      (("adapter", init.adapter), ("LoRA", init.lora), ("checkpoint", init.trainable)) if path})
    return files


def _pair_manifest(cfg: TrainConfig, acc) -> Path:
    if cfg.data.manifest:
        return Path(cfg.data.manifest)
    from .dpo_data import write_synthetic_pairs
    from .sft import default_photos

    folder = Path(cfg.run.output_dir) / "synthetic_pairs"
    if acc.is_main_process:
        write_synthetic_pairs(folder, cfg.data.synthetic, cfg.data.synthetic_photos or default_photos(),
                              task=cfg.loss.task, size=max(160, cfg.data.resolution))
    acc.wait_for_everyone()
    return folder / "pairs.jsonl"


def run_dpo(cfg: DPORunConfig, *, analyzer=None, accelerator=None) -> LoopResult:
    """Validate pairs, build models, load the SFT start, train with Eq. 7, checkpoint and export to
    ``<output_dir>/final`` (same files as SFT). ``analyzer``: face analyzer for the references (tests)."""
    from ..faces import load_analyzer
    from .dpo_data import PairEncoder, collate_pairs, encode_pairs, read_pair_manifest
    from .encode import free_text_encoder, sample_encoder, shard_needs_encoding
    from .export import export_weights
    from .models import build_pipeline, build_train_module

    tc = cfg.train
    acc = accelerator or make_accelerator(tc)
    record = dpo_config_to_dict(cfg)  # config.yaml and checkpoints carry the dpo section (--config <run>/config.yaml)
    plan = check_run(tc, acc, config=record, start_weights=_start_files(cfg), trainer="idglow-dpo")
    analyzer = analyzer or load_analyzer(tc.model.face_backend, model_dir=tc.model.face_model_dir or None)
    pairs = read_pair_manifest(_pair_manifest(tc, acc), analyzer, max_ids=tc.model.max_ids,
                               resolution=tc.data.resolution)
    probe = PairEncoder(sample_encoder(tc, None, None), tc.data.resolution)  # full cache: no text encoder
    pipe = build_pipeline(tc, text_encoder=shard_needs_encoding(pairs, probe.is_cached, acc))
    pipe.to(acc.device)
    encoded = encode_pairs(tc, pipe, pairs, accelerator=acc)  # on disk, loaded lazily
    free_text_encoder(pipe)
    init = find_init_weights(cfg.dpo.init_from) if cfg.dpo.init_from else InitWeights()
    build_cfg = tc if init.adapter is None else dataclasses.replace(
        tc, model=dataclasses.replace(tc.model, init_adapter=str(init.adapter)))
    set_seed(tc.run.seed)  # same adapter / LoRA initialisation on every rank and in every rerun
    module = build_train_module(build_cfg, pipe, id_dim=int(encoded[0]["id_embeds"].shape[1]))
    load_init_weights(module, init, tc.run.train)
    if not (cfg.dpo.init_from or tc.model.init_adapter):
        log.warning("DPO starts from an untrained adapter (no dpo.init_from): fine for smoke runs; real runs "
                    "start from the SFT output.")
    meta = {"task": tc.loss.task, "trained_steps": str(tc.optim.max_steps), "trainer": "idglow-dpo",
            "dpo": json.dumps(dataclasses.asdict(cfg.dpo))}
    validator = None
    if tc.run.validate_every:
        from .encode import collate
        from .sft import vae_decoder
        from .validate import FaceSimValidator
        validator = FaceSimValidator(encoded[: tc.run.validate_samples], collate, vae_decoder(pipe.vae), analyzer,
                                     steps=tc.run.validate_steps, seed=tc.run.seed,
                                     out_dir=Path(tc.run.output_dir) / "validation")
    parts = LoopParts(module=module, samples=encoded, collate=collate_pairs, step_fn=DPOStep(tc.loss, cfg.dpo),
                      export=lambda m, folder, state: export_weights(m, folder, tc.run.train, meta, state),
                      validate=validator, config=record)
    return run_loop(tc, parts, resume_from=claim(plan, tc, acc, record), accelerator=acc)  # all checks passed
