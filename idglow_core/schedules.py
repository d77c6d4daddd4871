"""Dynamics-aware identity modulation: the schedules Omega(t) of the paper (§3.3, Eq. 4-5, Fig. 4).

One registry serves twice: as the ID-loss weight in SFT (Eq. 1, ``L = L_flow + Omega(t) * lambda * L_ID``)
and as the injection strength of the multi-ID cross-attention at inference (``weight * Omega(t)``).

``t`` is flow time in [0, 1] with 1 = pure noise and 0 = clean image; this is the diffusers Qwen-Image
``timestep`` argument (sigma) and ComfyUI's ``transformer_options["sigmas"]``.

Presets (``SCHEDULES``):

=================  ==========================================  =============================================
name               Omega(t)                                    parameters
=================  ==========================================  =============================================
``anneal``         max(0, (t - tau) / (1 - tau))   (Eq. 4)     ``tau`` in [0, 1), default 0.3
``gate``           1 if lo <= t <= hi else 0       (Eq. 5)     ``lo`` = 0.3, ``hi`` = 0.6, inclusive
``constant``       value                                       ``value`` = 1.0
``none``           0                                           -
``smooth_anneal``  anneal with its kink at tau rounded off     ``tau``, ``softness`` = 0.1 (width of the bend)
``smooth_gate``    gate with smoothstep edges of width s       ``lo``, ``hi``, ``softness`` = 0.1
                   centred on lo and hi (0.5 at each edge)
``custom``         piecewise-linear through ``points``          ``points`` = [(t, w), ...], t increasing;
                   (held constant outside the first/last t)
=================  ==========================================  =============================================

Example::

    omega("gate", 0.45)                       # 1.0
    omega("anneal", torch.tensor([1.0, 0.3]), tau=0.3)   # tensor([1., 0.])
    Schedule.parse("gate(lo=0.2,hi=0.7)")(0.65)          # 1.0
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import torch

from .errors import ConfigError, InputError

if TYPE_CHECKING:  # PIL is imported inside plot_schedules
    from PIL import Image

__all__ = ["SCHEDULES", "DEFAULTS", "TASK_SCHEDULES", "Schedule", "omega", "plot_schedules", "plot_colour"]

Times = Union[float, torch.Tensor]
_T_EPS = 1e-6  # sigmas arrive in float32; 1.0000001 is still "pure noise"


def _check_unit(name: str, value: float, *, upper_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or value > 1 \
            or (upper_open and value >= 1):
        span = "[0, 1)" if upper_open else "[0, 1]"
        raise ConfigError(f"Schedule parameter {name}={value!r} is outside {span}. Flow time t runs from 1 (pure "
                          f"noise) to 0 (clean image); choose {name} in {span}.")


def _check_softness(s: float) -> None:
    if not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0 or s > 1:
        raise ConfigError(f"softness={s!r} must be in (0, 1]: it is the width in t of the smoothed edge. "
                          f"Use e.g. 0.1, or the hard-edged schedule for softness 0.")


def _anneal(t: torch.Tensor, tau: float = 0.3) -> torch.Tensor:
    _check_unit("tau", tau, upper_open=True)
    return torch.clamp((t - tau) / (1.0 - tau), min=0.0)  # Eq. 4


def _check_window(lo: float, hi: float) -> None:
    _check_unit("lo", lo)
    _check_unit("hi", hi)
    if lo > hi:
        raise ConfigError(f"gate window lo={lo} > hi={hi}. The window is lo <= t <= hi; swap the two values.")


def _gate(t: torch.Tensor, lo: float = 0.3, hi: float = 0.6) -> torch.Tensor:
    _check_window(lo, hi)
    return ((t >= lo) & (t <= hi)).to(t.dtype)  # Eq. 5 (inclusive at both ends)


def _constant(t: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"constant value={value!r} must be a finite number >= 0.")
    return torch.full_like(t, float(value))


def _none(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t)


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _smooth_gate(t: torch.Tensor, lo: float = 0.3, hi: float = 0.6, softness: float = 0.1) -> torch.Tensor:
    _check_window(lo, hi)
    _check_softness(softness)
    rise = _smoothstep((t - lo) / softness + 0.5)
    fall = _smoothstep((hi - t) / softness + 0.5)
    return rise * fall


def _smooth_anneal(t: torch.Tensor, tau: float = 0.3, softness: float = 0.1) -> torch.Tensor:
    _check_unit("tau", tau, upper_open=True)
    _check_softness(softness)
    if softness / 2 > 1 - tau:
        raise ConfigError(f"smooth_anneal softness={softness} is wider than twice the ramp 1 - tau = {1 - tau:g}; "
                          f"use softness <= {2 * (1 - tau):g}.")
    u, h = t - tau, softness / 2
    # max(0, u) with its kink replaced by a parabola on [-h, h] (value and slope continuous), then Eq. 4's scaling.
    ramp = torch.where(u <= -h, torch.zeros_like(u), torch.where(u >= h, u, (u + h) ** 2 / (4 * h)))
    return ramp / (1.0 - tau)


def _normalise_points(points: Any) -> list[tuple[float, float]]:
    try:
        pts = [(float(a), float(b)) for a, b in points]
    except (TypeError, ValueError):
        raise ConfigError(f"custom schedule points={points!r} must be a list of (t, weight) pairs, "
                          f"e.g. [(0, 0), (0.5, 1), (1, 0)].") from None
    if len(pts) < 1:
        raise ConfigError("custom schedule needs at least one (t, weight) point.")
    for a, w in pts:
        _check_unit("point t", a)
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"custom schedule weight {w} at t={a} must be a finite number >= 0.")
    if any(b[0] <= a[0] for a, b in zip(pts, pts[1:])):
        raise ConfigError(f"custom schedule points must have strictly increasing t, got {[p[0] for p in pts]}.")
    return pts


def _custom(t: torch.Tensor, points: Sequence[Sequence[float]] = ((0.0, 1.0), (1.0, 1.0))) -> torch.Tensor:
    pts = _normalise_points(points)
    xs = torch.tensor([p[0] for p in pts], dtype=t.dtype, device=t.device)
    ys = torch.tensor([p[1] for p in pts], dtype=t.dtype, device=t.device)
    if len(pts) == 1:
        return torch.full_like(t, pts[0][1])
    idx = torch.searchsorted(xs, t.clamp(xs[0], xs[-1]).contiguous(), right=True).clamp(1, len(pts) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    frac = ((t - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return y0 + frac * (y1 - y0)


SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "anneal": _anneal, "gate": _gate, "constant": _constant, "none": _none,
    "smooth_anneal": _smooth_anneal, "smooth_gate": _smooth_gate, "custom": _custom,
}
"""name -> ``fn(t: Tensor, **params) -> Tensor`` (same shape as t). Add entries to register new schedules."""

DEFAULTS: dict[str, dict[str, Any]] = {
    "anneal": {"tau": 0.3}, "gate": {"lo": 0.3, "hi": 0.6}, "constant": {"value": 1.0}, "none": {},
    "smooth_anneal": {"tau": 0.3, "softness": 0.1}, "smooth_gate": {"lo": 0.3, "hi": 0.6, "softness": 0.1},
    "custom": {"points": [(0.0, 1.0), (1.0, 1.0)]},
}


def _as_times(t: Times) -> tuple[torch.Tensor, bool]:
    if isinstance(t, torch.Tensor):
        tt = t.to(torch.promote_types(t.dtype, torch.float32)) if not t.is_floating_point() or \
            t.dtype in (torch.float16, torch.bfloat16) else t
        is_tensor = True
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        tt, is_tensor = torch.tensor(float(t), dtype=torch.float64, device="cpu"), False
    else:
        raise InputError(f"t must be a float or a torch.Tensor of flow times, got {type(t).__name__}.")
    if tt.numel() and (not torch.isfinite(tt).all() or tt.min() < -_T_EPS or tt.max() > 1 + _T_EPS):
        raise InputError(f"Flow time t must lie in [0, 1] (1 = pure noise, 0 = clean), got values in "
                         f"[{tt.min().item():.4g}, {tt.max().item():.4g}]. Pass sigma, not the 0..1000 "
                         f"scheduler timestep (divide it by 1000).")
    return tt.clamp(0.0, 1.0), is_tensor


def omega(name: str, t: Times, **params: Any) -> Times:
    """Schedule ``name`` evaluated at flow time(s) ``t``.

    t: a float, or a tensor of any shape (e.g. ``[B]``) with values in [0, 1]. Returns a float for a float,
    else a tensor of t's shape (float32, or float64 for float64 input). Raises :class:`ConfigError` for an
    unknown name or bad parameters and :class:`InputError` for t outside [0, 1].
    """
    if name not in SCHEDULES:
        raise ConfigError(f"Unknown schedule '{name}'. Use one of: {', '.join(SCHEDULES)}.")
    tt, is_tensor = _as_times(t)
    try:
        out = SCHEDULES[name](tt, **params)
    except TypeError as exc:
        raise ConfigError(f"Bad parameters {sorted(params)} for schedule '{name}' ({exc}). "
                          f"Its parameters are {sorted(DEFAULTS.get(name, {}))}.") from None
    return out if is_tensor else float(out)


@dataclass(frozen=True)
class Schedule:
    """A named schedule with its parameters; callable on t, serialisable for file metadata and node wiring.

    ``Schedule("gate")`` uses the preset defaults; ``Schedule("anneal", {"tau": 0.2})`` overrides them.
    """

    name: str = "constant"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"Unknown schedule '{self.name}'. Use one of: {', '.join(SCHEDULES)}.")
        params = dict(self.params)
        if "points" in params:
            params["points"] = [tuple(p) for p in _normalise_points(params["points"])]
        object.__setattr__(self, "params", params)
        omega(self.name, 0.5, **self.params)  # validates the parameters now, not at sampling time

    def __call__(self, t: Times) -> Times:
        return omega(self.name, t, **self.params)

    def full_params(self) -> dict[str, Any]:
        """The preset defaults merged with this schedule's overrides."""
        return {**DEFAULTS.get(self.name, {}), **self.params}

    def to_dict(self) -> dict[str, Any]:
        params = self.full_params()
        if "points" in params:
            params["points"] = [list(p) for p in params["points"]]
        return {"name": self.name, "params": params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schedule":
        if not isinstance(data, dict) or "name" not in data:
            raise ConfigError(f"A schedule dict needs a 'name' (and optional 'params'), got {data!r}.")
        return cls(str(data["name"]), dict(data.get("params") or {}))

    def to_str(self) -> str:
        """Compact JSON, e.g. ``{"name":"gate","params":{"lo":0.3,"hi":0.6}}`` (safetensors metadata value)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """From ``to_str()`` JSON, a bare name (``"gate"``), or ``"name(k=v,...)"``; custom points as
        ``"custom(0:0,0.5:1,1:0)"``."""
        text = str(text).strip()
        if text.startswith("{"):
            try:
                return cls.from_dict(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"Schedule string {text!r} is not valid JSON ({exc}).") from None
        name, _, rest = text.partition("(")
        name, rest = name.strip(), rest.rstrip().removesuffix(")")
        params: dict[str, Any] = {}
        items = [s.strip() for s in rest.split(",") if s.strip()]
        try:
            if name == "custom" and items:
                params["points"] = [tuple(float(v) for v in s.split(":")) for s in items]
            for item in ([] if name == "custom" else items):
                key, _, value = item.partition("=")
                params[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"Cannot parse schedule {text!r}. Examples: 'gate', 'anneal(tau=0.3)', "
                              f"'smooth_gate(lo=0.3,hi=0.6,softness=0.1)', 'custom(0:0,0.5:1,1:0)'.") from None
        return cls(name, params)


TASK_SCHEDULES: dict[str, Schedule] = {
    # Task 1 (group fusion, Eq. 4). The paper gives no tau. 0.3 switches injection off for the last
    # texture-refinement stretch t < 0.3, the same boundary the paper uses for Task 2's window (Fig. 4b):
    # identity while layout and faces form, free lighting/skin texture at the end.
    "group": Schedule("anneal", {"tau": 0.3}),
    "age": Schedule("gate", {"lo": 0.3, "hi": 0.6}),  # Task 2, Eq. 5: the semantic window only
}


def _colour(i: int) -> tuple[int, int, int]:
    palette = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (23, 190, 207)]
    return palette[i % len(palette)]


def plot_schedules(schedules: Sequence[Schedule | str], width: int = 480, height: int = 240,
                   samples: int = 241) -> "Image.Image":
    """Draw Omega(t) curves in sampling order (t = 1 on the left, 0 on the right); returns an RGB PIL image.

    Curve i is drawn in ``plot_colour(i)``; the y axis spans [0, max(1, largest weight)].
    """
    from PIL import Image, ImageDraw

    scheds = [s if isinstance(s, Schedule) else Schedule.parse(s) for s in schedules]
    if not scheds or width < 64 or height < 64:
        raise InputError("plot_schedules needs at least one schedule and an image of at least 64x64 px.")
    ts = torch.linspace(1.0, 0.0, samples, dtype=torch.float64)
    curves = [s(ts) for s in scheds]
    y_max = max(1.0, max(float(c.max()) for c in curves))
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 28, width - 8, 8, height - 20
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for frac in (0.25, 0.5, 0.75):
        x = left + frac * (right - left)
        draw.line([(x, top), (x, bottom)], fill=(225, 225, 225))
    draw.text((left, bottom + 4), "t=1 noise", fill=(0, 0, 0))
    draw.text((right - 56, bottom + 4), "t=0 clean", fill=(0, 0, 0))
    draw.text((2, top), f"{y_max:g}", fill=(0, 0, 0))
    draw.text((2, bottom - 10), "0", fill=(0, 0, 0))
    for i, (s, c) in enumerate(zip(scheds, curves)):
        pts = [(left + (1.0 - float(t)) * (right - left), bottom - float(v) / y_max * (bottom - top))
               for t, v in zip(ts, c)]
        draw.line(pts, fill=_colour(i), width=2)
        draw.text((left + 6, top + 4 + 12 * i), s.name, fill=_colour(i))
    return img


def plot_colour(i: int) -> tuple[int, int, int]:
    """RGB colour of curve ``i`` in :func:`plot_schedules`."""
    return _colour(i)
