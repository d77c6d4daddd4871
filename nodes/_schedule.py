"""The IdGlow Schedule node's logic without ComfyUI: widget values -> :class:`Schedule` (+ its plot)."""
from __future__ import annotations

import numpy as np

from idglow_core.errors import ConfigError
from idglow_core.schedules import SCHEDULES, Schedule, plot_schedules

__all__ = ["PRESETS", "build_schedule", "plot_array", "parse_points"]

PRESETS = ("anneal", "gate", "constant", "custom", "smooth_anneal", "smooth_gate", "none")
_USES = {"anneal": ("tau",), "gate": ("lo", "hi"), "constant": ("value",), "none": (),
         "smooth_anneal": ("tau", "softness"), "smooth_gate": ("lo", "hi", "softness"), "custom": ("points",)}


def parse_points(text: str) -> list[tuple[float, float]]:
    """'1:0, 0.6:1, 0.3:1, 0:0' -> [(0, 0), (0.3, 1), (0.6, 1), (1, 0)] (t:weight pairs, any order)."""
    pairs = []
    for item in (s.strip() for s in str(text).replace(";", ",").split(",")):
        if not item:
            continue
        t, sep, w = item.partition(":")
        try:
            if not sep:
                raise ValueError(item)
            pairs.append((float(t), float(w)))
        except ValueError:
            raise ConfigError(f"Custom schedule point '{item}' is not 't:weight'. Write points like "
                              f"'1:0, 0.6:1, 0.3:1, 0:0' (t = 1 is pure noise, t = 0 the clean image).") from None
    if not pairs:
        raise ConfigError("The custom schedule has no points. Write at least one 't:weight' pair, e.g. '0:1'.")
    return sorted(pairs)


def build_schedule(preset: str, tau: float, lo: float, hi: float, value: float, softness: float,
                   points: str) -> Schedule:
    """A :class:`Schedule` from the node's widgets; only the parameters of ``preset`` are used."""
    if preset not in PRESETS or preset not in SCHEDULES:
        raise ConfigError(f"Unknown schedule preset '{preset}'. Use one of {list(PRESETS)}.")
    given = {"tau": float(tau), "lo": float(lo), "hi": float(hi), "value": float(value),
             "softness": float(softness)}
    params = {k: given[k] for k in _USES[preset] if k != "points"}
    if "points" in _USES[preset]:
        params["points"] = parse_points(points)
    return Schedule(preset, params)


def plot_array(schedule: Schedule, width: int = 480, height: int = 240) -> np.ndarray:
    """``[height, width, 3]`` uint8 plot of Omega(t), t = 1 (noise) on the left to 0 (clean) on the right."""
    return np.asarray(plot_schedules([schedule], width=width, height=height).convert("RGB"))
