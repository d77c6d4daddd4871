"""Fine-grained group-level DPO (paper §3.4, Eq. 6-7) on the shared training loop.

Per micro-step, for pairs (chosen ``z_w``, rejected ``z_l``) with the same references and prompt::

    t, eps ~ one draw per pair, shared by chosen and rejected
    v_ref  = the reference policy (no_grad): the starting adapter + LoRA (dpo.reference=start, default)
             or the base DiT with both off (dpo.reference=base); see dpo_reference.py
    v      = network as trained                                          (with grad)
    Delta  = ||v - v*||^2 - ||v_ref - v*||^2,  v* = eps - z0             (Eq. 6)
    x      = -beta/2 (alpha Delta_w - Delta_l)
    L      = -log sigmoid(x - m) + lambda_SFT ||v_w - v*_w||^2           (Eq. 7, margin as intended)

Eq. 7 as printed has ``x + m``, which makes the loss smaller as m grows (at x = 0, m = 1: 0.313 instead of
ln 2 = 0.693) and so rewards no gap at all. IdGlow subtracts m, as SimPO does (1.313 at x = 0, m = 1: the
loss only falls once the preference exceeds m); ``dpo.margin_form=printed`` restores the typeset sign.

Each pair is injected with its own task's Omega(t), as in SFT (``loss.injection``). ``dpo.sequential``
trades time for memory: the DiT never holds the graph of both latents at once (:class:`DPOStep`).
``run.train=full`` is refused: a fully fine-tuned DiT has no "off" switch and no small trainable part to
copy, and a frozen second copy of a 20 B model is what this design avoids; run DPO with ``run.train=lora``
(or ``adapter``) on top of the SFT result instead.

Config: the SFT sections plus ``dpo:`` (:class:`DPOConfig`). From ``loss`` the timestep sampling
(``timestep_scheme``, ``logit_mean/std``, ``timestep_shift``), ``task``, ``schedule`` and ``injection`` (the
injection strength per sample) apply; ``id_weight`` is SFT-only. Checkpoints, resume, accelerate and the
exported files are the SFT trainer's (``loop.run_loop``).

Starting point (``dpo.init_from``): an SFT output folder (``<run>/final`` or ``<run>``) holding
``idglow_adapter.safetensors`` and optionally ``pytorch_lora_weights.safetensors``, a checkpoint folder
(``<run>/checkpoints/step-N``; its EMA weights when present), or one adapter ``.safetensors`` file. A LoRA
from SFT keeps training (``run.train=lora``) and is part of the start reference.

    from idglow_core.training.dpo import load_dpo_config, run_dpo
    result = run_dpo(load_dpo_config("train/configs/dpo_tiny_cpu.yaml"))
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn
from accelerate.utils import set_seed

from ..errors import ConfigError, ModelFormatError, ModelNotFoundError
from ..yamlfile import read_yaml_mapping
from ..adapter import TRAIN_INJECTION_KEY
from ..losses import MARGIN_FORMS, add_noise, per_sample_mse, velocity_target, weighted_margin_dpo_loss
from .dpo_reference import StartReference, reference_policy
from .config import LossConfig, TrainConfig, coerce_value, apply_overrides, config_from_dict, config_to_dict
from .loop import LoopParts, LoopResult, StepOutput, check_run, claim, make_accelerator, run_loop
from .sft import draw_t_and_noise

__all__ = ["DPOConfig", "DPORunConfig", "load_dpo_config", "dpo_config_to_dict", "reference_policy",
           "StartReference", "REFERENCES", "DPOStep",
           "InitWeights", "find_init_weights", "load_init_weights", "run_dpo"]

log = logging.getLogger("idglow")
REFERENCES = ("start", "base")  # dpo.reference


@dataclass
class DPOConfig:
    """The ``dpo:`` section. ``alpha=1, margin=0, sft_weight=0`` is plain Diffusion-DPO (Eq. 7)."""

    # Diffusion-DPO uses 5000 on eps-MSE (SD1.5/SDXL). Velocity errors (v* = eps - z0) have a different, t-
    # dependent scale, so 2500 is a starting point, not a derived value: tune it per dataset while watching
    # rewards/margins and implicit_acc.
    beta: float = 2500.0
    alpha: float = 1.0  # asymmetric weight on the chosen pair's Delta (Eq. 7)
    margin: float = 0.0  # margin m >= 0 (Eq. 7): -log sigmoid(x - m), a minimum preference gap
    margin_form: str = "intent"  # intent: x - m (SimPO) | printed: x + m, Eq. 7 as typeset (see losses.py)
    sft_weight: float = 0.0  # lambda_SFT: flow loss on the chosen sample (Eq. 7)
    init_from: str = ""  # SFT output folder, checkpoint folder or adapter file; "" = model.init_adapter/fresh
    reference: str = "start"  # start: the starting adapter + LoRA (frozen copy) | base: DiT with both off
    sequential: bool = False  # chosen and rejected forward+backward one after the other (less memory)

    def __post_init__(self):
        values = (self.beta, self.alpha, self.margin, self.sft_weight)
        if not all(math.isfinite(v) for v in values) or \
                not (self.beta > 0 and self.alpha > 0 and self.margin >= 0 and self.sft_weight >= 0):
            raise ConfigError(f"DPO needs dpo.beta > 0, dpo.alpha > 0, dpo.margin >= 0 and dpo.sft_weight >= 0 "
                              f"(Eq. 7); got {self.beta}, {self.alpha}, {self.margin}, {self.sft_weight}.")
        if self.reference not in REFERENCES or self.margin_form not in MARGIN_FORMS:
            raise ConfigError(f"dpo.reference must be one of {REFERENCES} (got '{self.reference}') and "
                              f"dpo.margin_form one of {MARGIN_FORMS} (got '{self.margin_form}').")


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


# ---------------------------------------------------------------------------------------- the step
def _twice(x: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` -> ``[2B, ...]``: the same conditioning for the chosen and the rejected half."""
    return torch.cat([x, x])


class DPOStep:
    """One DPO micro-step: ``(module, batch, generator) -> StepOutput`` for :func:`run_loop`.

    ``reference``: context manager factory that turns ``module`` into the reference policy (a
    :class:`StartReference` snapshot, :func:`reference_policy`, or a test stand-in). None: per
    ``dpo.reference``; for ``start`` the snapshot is then taken at the first call (the trainer builds it
    before training instead, so that a resumed run keeps the true start). The batch is
    :func:`~idglow_core.training.dpo_data.collate_pairs` output (+ ``task``, one per pair).

    Joint mode runs the DiT on ``[z_w; z_l]`` (2B) with grad. ``dpo.sequential`` gives the same gradients
    with the graph of B latents at a time: the reference passes (no_grad, B each), the chosen forward with
    grad, a no_grad rejected forward; the sigmoid coefficients of Eq. 7 (dL/d err, exact) then
    weight a backward of the chosen errors, and the rejected side runs forward + backward alone. Cost: one
    extra forward on B latents over the joint mode (the brief's variant, a no_grad pass over both sides
    before two forward+backward passes, costs two).
    """

    def __init__(self, loss: LossConfig, dpo: DPOConfig,
                 reference: Callable[[nn.Module], ContextManager] | None = None):
        self.loss, self.dpo, self.reference = loss, dpo, reference

    def _reference(self, module: nn.Module) -> ContextManager:
        if self.reference is None:
            self.reference = StartReference(module) if self.dpo.reference == "start" else reference_policy
        return self.reference(module)

    def _loss(self, err_w, err_l, ref_w, ref_l):
        d = self.dpo
        return weighted_margin_dpo_loss(err_w, err_l, ref_w, ref_l, beta=d.beta, alpha=d.alpha, margin=d.margin,
                                        sft_weight=d.sft_weight, margin_form=d.margin_form)  # Eq. 6-7

    def __call__(self, module: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        device = next(module.parameters()).device
        z_w, z_l = batch["latents"].to(device), batch["latents_rejected"].to(device)  # [B, C, 1, h, w] each
        t, eps = draw_t_and_noise(self.loss, z_w, generator)       # one t and one noise per pair, shared
        inject = self.loss.injection_scale(batch.get("task"), t)   # [B] each pair's Omega_task(t), as deployed
        cond = ([r.to(device) for r in batch["ref_latents"]], batch["prompt_embeds"].to(device),
                batch["prompt_mask"].to(device), batch["id_embeds"].to(device), batch["id_mask"].to(device))
        if self.dpo.sequential:
            return self._sequential(module, z_w, z_l, t, eps, inject, cond)
        t2, eps2 = _twice(t), _twice(eps)
        z0 = torch.cat([z_w, z_l])                                 # [2B, ...]: chosen first, then rejected
        target = velocity_target(z0, eps2)                         # v* = eps - z0 (Eq. 6)
        args = (add_noise(z0, eps2, t2), t2, [_twice(r) for r in cond[0]], *[_twice(x) for x in cond[1:]],
                _twice(inject))
        with torch.no_grad(), self._reference(module):             # reference first: nothing interleaves
            ref_err = per_sample_mse(module(*args), target)        # ||v_ref - v*||^2, [2B]
        err = per_sample_mse(module(*args), target)                # ||v_theta - v*||^2, [2B]
        b = z_w.shape[0]
        loss, metrics = self._loss(err[:b], err[b:], ref_err[:b], ref_err[b:])
        return StepOutput(loss=loss, logs=self._logs(loss, metrics, err[:b], err[b:], ref_err[:b], ref_err[b:],
                                                     inject))

    def _sequential(self, module, z_w, z_l, t, eps, inject, cond) -> StepOutput:
        sides = []
        for z0 in (z_w, z_l):
            target = velocity_target(z0, eps)
            sides.append((target, (add_noise(z0, eps, t), t, *cond, inject)))
        with torch.no_grad(), self._reference(module):  # per side, shaped as the policy passes: at the start
            ref_w, ref_l = (per_sample_mse(module(*args), target) for target, args in sides)  # both agree bitwise
        (target_w, args_w), (target_l, args_l) = sides
        err_w = per_sample_mse(module(*args_w), target_w)          # chosen, with grad (its graph is kept)
        with torch.no_grad():
            err_l = per_sample_mse(module(*args_l), target_l)      # rejected, values only
        a, r = err_w.detach().requires_grad_(True), err_l.clone().requires_grad_(True)
        with torch.enable_grad():
            loss, metrics = self._loss(a, r, ref_w, ref_l)
            coef_w, coef_l = torch.autograd.grad(loss, (a, r))     # dL/d err: Eq. 7's sigmoid coefficients

        def run_backward(backward: Callable[[torch.Tensor, bool], None]) -> None:
            backward((coef_w * err_w).sum(), False)                # the chosen side's share of dL/d theta
            err_l_grad = per_sample_mse(module(*args_l), target_l)  # the rejected side alone
            backward((coef_l * err_l_grad).sum(), True)

        return StepOutput(loss=loss.detach(), logs=self._logs(loss, metrics, err_w, err_l, ref_w, ref_l, inject),
                          run_backward=run_backward)

    @staticmethod
    def _logs(loss, metrics, err_w, err_l, ref_w, ref_l, inject) -> dict[str, Any]:
        return {"loss/dpo": loss.item(), **metrics, "mse/chosen": err_w.mean().item(),
                "mse/rejected": err_l.mean().item(), "mse_ref/chosen": ref_w.mean().item(),
                "mse_ref/rejected": ref_l.mean().item(), "inject/scale": inject.mean().item()}


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
                              f"dropped. Use run.train=lora (the LoRA keeps training and is part of the start "
                              f"reference).")
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

    from .data import TaskTagged, with_tasks

    tc = cfg.train
    acc = accelerator or make_accelerator(tc)
    from accelerate.utils import DistributedType
    if cfg.dpo.reference == "start" and acc.distributed_type == DistributedType.FSDP:
        raise ConfigError("dpo.reference=start keeps a copy of the starting adapter + LoRA tensors, which FSDP "
                          "shards. Train DPO under DDP (accelerate_ddp_bf16.yaml: adapter/LoRA fit it), or set "
                          "dpo.reference=base.")
    record = dpo_config_to_dict(cfg)  # config.yaml and checkpoints carry the dpo section (--config <run>/config.yaml)
    plan = check_run(tc, acc, config=record, start_weights=_start_files(cfg), trainer="idglow-dpo")
    analyzer = analyzer or load_analyzer(tc.model.face_backend, model_dir=tc.model.face_model_dir or None)
    pairs = read_pair_manifest(_pair_manifest(tc, acc), analyzer, max_ids=tc.model.max_ids,
                               resolution=tc.data.resolution)
    probe = PairEncoder(sample_encoder(tc, None, None), tc.data.resolution)  # full cache: no text encoder
    pipe = build_pipeline(tc, text_encoder=shard_needs_encoding(pairs, probe.is_cached, acc))
    pipe.to(acc.device)
    encoded = TaskTagged(encode_pairs(tc, pipe, pairs, accelerator=acc), [p.task for p in pairs])  # on disk, lazy
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
    reference = StartReference(module) if cfg.dpo.reference == "start" else reference_policy  # before resume
    meta = {"task": tc.loss.task, "trained_steps": str(tc.optim.max_steps), "trainer": "idglow-dpo",
            "dpo": json.dumps(dataclasses.asdict(cfg.dpo)),
            TRAIN_INJECTION_KEY: json.dumps(tc.loss.train_injection([p.task for p in pairs]))}
    validator = None
    if tc.run.validate_every:
        from .encode import collate
        from .sft import vae_decoder
        from .validate import FaceSimValidator
        validator = FaceSimValidator(encoded[: tc.run.validate_samples], with_tasks(collate), vae_decoder(pipe.vae),
                                     analyzer, steps=tc.run.validate_steps, seed=tc.run.seed,
                                     out_dir=Path(tc.run.output_dir) / "validation", injection=tc.loss.injection_scale)
    parts = LoopParts(module=module, samples=encoded, collate=with_tasks(collate_pairs),
                      step_fn=DPOStep(tc.loss, cfg.dpo, reference),
                      export=lambda m, folder, state: export_weights(m, folder, tc.run.train, meta, state),
                      validate=validator, config=record)
    return run_loop(tc, parts, resume_from=claim(plan, tc, acc, record), accelerator=acc)  # all checks passed
