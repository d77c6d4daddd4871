"""Adapter loading and the IdGlow Apply nodes (Simple / Advanced share one core call: ``apply_idglow``)."""
from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import folder_paths
import torch
from comfy_api.latest import io

from idglow_core.adapter import IdGlowAdapter
from idglow_core.errors import InputError, ModelNotFoundError

from ._comfy import CATEGORY, AdapterType, IdsType, ScheduleType
from ._convert import check_choice, parse_weights
from .patch import APPLY_TO, IdGlowPatch, check_adapter_fits, mark_positive

log = logging.getLogger("idglow")

_WEIGHT_TIP = "Identity strength; the injected residual is weight * Omega(t). 0 leaves the model's output unchanged."


def missing_adapter_message(name: str) -> str:
    """Why an adapter is not there and what to do (IdGlow ships no trained adapter)."""
    return (f"IdGlow adapter '{name}' is not in the 'idglow' model folders {folder_paths.get_folder_paths('idglow')}. "
            f"IdGlow ships no trained adapter: train one with train/sft.py (README, 'Training'; the tiny CPU config "
            f"only checks the set-up) and copy its final/idglow_adapter.safetensors into ComfyUI/models/idglow/, "
            f"then refresh the page and pick it here. Without an adapter, use the training-free workflow "
            f"(seed search and identity guidance on the base model).")


class IdGlowAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowAdapterLoader", display_name="IdGlow Adapter Loader", category=CATEGORY,
            description="Loads an IdGlow adapter (multi-ID encoder + one identity cross-attention per DiT block) "
                        "from models/idglow. ComfyUI loads and offloads it together with the model it patches.",
            inputs=[io.Combo.Input("adapter_name", options=folder_paths.get_filename_list("idglow"),
                                   tooltip="An IdGlow .safetensors file in models/idglow.")],
            outputs=[AdapterType.Output(display_name="adapter", tooltip="Connect to IdGlow Apply.")])

    @classmethod
    def validate_inputs(cls, adapter_name) -> bool | str:
        """Checked when the prompt is queued: a missing adapter stops the run before any model is loaded, with
        what ships, how to make one and where it goes."""
        return True if adapter_name in folder_paths.get_filename_list("idglow") else missing_adapter_message(adapter_name)

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        if adapter_name not in folder_paths.get_filename_list("idglow"):
            raise ModelNotFoundError(missing_adapter_message(adapter_name))
        path = folder_paths.get_full_path_or_raise("idglow", adapter_name)
        device = mm.get_torch_device()
        dtype = torch.bfloat16 if device.type != "cpu" and mm.should_use_bf16(device) else torch.float32
        adapter = IdGlowAdapter.load(path, dtype=dtype).eval().requires_grad_(False)
        return io.NodeOutput(wrap_adapter(adapter))


class AdapterPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher that loads and offloads the adapter whole, never part of it.

    With little free VRAM (or --lowvram / --novram) ComfyUI moves only the layers that fit its byte budget and
    casts the others' weights on the fly, which works for ``comfy.ops`` layers only. The adapter's layers are
    plain torch layers: split between devices, ``block_residual`` would mix CPU and GPU tensors. The adapter is
    ~1.3 % of the DiT, so it is always loaded in full, and given back in full when memory is freed.
    """

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        return super().load(device_to, lowvram_model_memory, force_patch_weights, full_load=True)

    def partially_unload(self, device_to, memory_to_free=0):
        return 0  # nothing freed in part: ComfyUI then unloads the whole adapter (LoadedModel.model_unload)


def wrap_adapter(adapter: IdGlowAdapter) -> AdapterPatcher:
    """A ModelPatcher around the adapter, so ComfyUI's memory manager moves it to the GPU and back."""
    return AdapterPatcher(adapter, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def apply_idglow(model, adapter_patcher, ids, schedule, weight: float, id_weights: list[float] | None = None,
                 apply_to: str = "both"):
    """``model.clone()`` with the IdGlow double-block patch installed; the input MODEL is never changed.

    ids: IdentitySet (``embeddings [k, d]``). schedule: a Schedule or None (the adapter's default).
    """
    adapter: IdGlowAdapter = adapter_patcher.model
    patched = model.clone()
    check_adapter_fits(adapter, patched.get_model_object("diffusion_model"))
    if ids.count > adapter.config.max_ids:
        raise InputError(f"{ids.count} identities were encoded but this adapter supports at most "
                         f"{adapter.config.max_ids}. Connect at most {adapter.config.max_ids} reference portraits.")
    sched = schedule if schedule is not None else adapter.default_schedule
    adapter.check_deployed_schedule(sched)  # warns when the adapter was trained with another injection schedule
    param = next(adapter.parameters())
    with torch.no_grad():
        cond = adapter.condition(ids.embeddings[None].to(param.device, param.dtype), weight=float(weight),
                                 schedule=sched, id_weights=None if id_weights is None else torch.tensor(id_weights))
    patched.set_model_double_block_patch(IdGlowPatch(adapter, cond, apply_to, adapter_patcher))
    if apply_to == "positive":  # tells the patch which chunks of the model batch are the positive prompt
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "idglow", mark_positive)
    log.info("IdGlow: %d identities, weight %g, schedule %s, apply to %s", ids.count, weight, sched.to_str(), apply_to)
    return patched


def _inputs(advanced: bool) -> list:
    inputs = [
        io.Model.Input("model", tooltip="A Qwen-Image(-Edit) MODEL (UNETLoader). It is cloned, never modified."),
        AdapterType.Input("adapter", tooltip="From IdGlow Adapter Loader."),
        IdsType.Input("ids", tooltip="From IdGlow Multi-ID Encode."),
        io.Float.Input("weight", default=1.0, min=0.0, max=3.0, step=0.01, tooltip=_WEIGHT_TIP),
        ScheduleType.Input("schedule", optional=True,
                           tooltip="From IdGlow Schedule. Unconnected: the adapter's default schedule."),
    ]
    if advanced:
        inputs += [
            io.String.Input("id_weights", default="", tooltip="Per-identity weights in reference order, e.g. "
                                                              "'1.0, 0.7'; missing ones are 1.0. Multiplies 'weight'."),
            io.Combo.Input("apply_to", options=list(APPLY_TO), default="both",
                           tooltip="both: every CFG branch, as in training. positive: only the positive prompt's "
                                   "branch, so CFG scales the identity effect."),
        ]
    return inputs


class IdGlowApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowApply", display_name="IdGlow Apply", category=CATEGORY, inputs=_inputs(False),
            description="Returns a copy of the MODEL that attends to the identity tokens in every dual-stream block, "
                        "on the target image tokens only, with strength weight * Omega(t).",
            outputs=[io.Model.Output(display_name="model", tooltip="The patched copy; connect to KSampler.")])

    @classmethod
    def execute(cls, model, adapter, ids, weight, schedule=None) -> io.NodeOutput:
        return io.NodeOutput(apply_idglow(model, adapter, ids, schedule, weight))


class IdGlowApplyAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowApplyAdvanced", display_name="IdGlow Apply (Advanced)", category=CATEGORY,
            inputs=_inputs(True),
            description="IdGlow Apply with a weight per identity and a choice of CFG branches.",
            outputs=[io.Model.Output(display_name="model", tooltip="The patched copy; connect to KSampler.")])

    @classmethod
    def execute(cls, model, adapter, ids, weight, id_weights, apply_to, schedule=None) -> io.NodeOutput:
        check_choice("apply_to", apply_to, APPLY_TO)
        weights = parse_weights(id_weights, ids.count)
        return io.NodeOutput(apply_idglow(model, adapter, ids, schedule, weight, weights, apply_to))
