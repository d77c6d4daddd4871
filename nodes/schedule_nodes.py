"""IdGlow Schedule (Omega(t) presets) and IdGlow Static Prompt (the paper's templates)."""
from __future__ import annotations

from comfy_api.latest import io

from idglow_core.prompting import TASKS, static_prompt

from ._comfy import CATEGORY, IdsType, ScheduleType
from ._convert import check_choice, numpy_to_image_batch
from ._schedule import PRESETS, build_schedule, plot_array

_T = "Flow time t: 1 = pure noise (start of sampling), 0 = clean image (end)."


class IdGlowSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowSchedule", display_name="IdGlow Schedule", category=CATEGORY,
            description="When during sampling the identity is injected: Omega(t) in flow time t (1 = noise, 0 = "
                        "clean). anneal = max(0, (t - tau)/(1 - tau)) (paper Eq. 4, Task 1); gate = 1 on "
                        "[lo, hi] (Eq. 5, Task 2: 0.3..0.6). The window is in t, so ModelSampling shift nodes do "
                        "not move it.",
            inputs=[
                io.Combo.Input("preset", options=list(PRESETS), default="anneal",
                               tooltip="anneal (Task 1), gate (Task 2), constant, custom points, smoothed "
                                       "variants, or none (injection off)."),
                io.Float.Input("tau", default=0.3, min=0.0, max=0.99, step=0.01,
                               tooltip=f"anneal: injection fades from full at t = 1 to 0 at t = tau. {_T}"),
                io.Float.Input("lo", default=0.3, min=0.0, max=1.0, step=0.01, tooltip=f"gate: window start. {_T}"),
                io.Float.Input("hi", default=0.6, min=0.0, max=1.0, step=0.01, tooltip=f"gate: window end. {_T}"),
                io.Float.Input("value", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="constant: the weight at every t."),
                io.Float.Input("softness", default=0.1, min=0.01, max=1.0, step=0.01,
                               tooltip="smooth_*: width in t of the rounded edges."),
                io.String.Input("points", default="1:1, 0.3:1, 0.2:0, 0:0", multiline=False,
                                tooltip="custom: 't:weight' pairs joined by straight lines, e.g. '1:0, 0.6:1, "
                                        "0.3:1, 0:0'."),
            ],
            outputs=[ScheduleType.Output(display_name="schedule", tooltip="Connect to IdGlow Apply."),
                     io.Image.Output(display_name="plot", tooltip="Omega(t) from t = 1 (left) to 0 (right).")])

    @classmethod
    def execute(cls, preset, tau, lo, hi, value, softness, points) -> io.NodeOutput:
        check_choice("preset", preset, PRESETS)
        schedule = build_schedule(preset, tau, lo, hi, value, softness, points)
        return io.NodeOutput(schedule, numpy_to_image_batch([plot_array(schedule)]))


class IdGlowStaticPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IdGlowStaticPrompt", display_name="IdGlow Static Prompt", category=CATEGORY,
            description="The paper's static prompt templates: 'group' (Task 1, a group photo of the k people) and "
                        "'age' (Task 2, the same people as children). Subjects are named Picture 1..k, left to right.",
            inputs=[
                io.Combo.Input("task", options=list(TASKS), default="group",
                               tooltip="group = direct group fusion; age = the same people as young children."),
                io.Int.Input("subjects", default=2, min=1, max=8,
                             tooltip="Number of people (reference pictures). Ignored when 'ids' is connected."),
                IdsType.Input("ids", optional=True, tooltip="Optional: take the number of people from these ids."),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="Connect to the text encoder's prompt.")])

    @classmethod
    def execute(cls, task, subjects, ids=None) -> io.NodeOutput:
        check_choice("task", task, TASKS)
        k = ids.count if ids is not None else int(subjects)
        return io.NodeOutput(static_prompt(task, k))
