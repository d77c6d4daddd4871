"""Omega(t) schedules (paper Eq. 4-5) against values worked out by hand."""
from __future__ import annotations

import pytest
import torch

from idglow_core.errors import ConfigError, InputError
from idglow_core.schedules import SCHEDULES, TASK_SCHEDULES, Schedule, omega, plot_colour, plot_schedules

TS = [0.0, 0.29, 0.3, 0.45, 0.6, 0.61, 1.0]

# Hand computation, t in TS order:
# anneal tau=0.3 (Eq. 4): max(0, (t-0.3)/0.7) -> 0, 0, 0, 0.15/0.7, 0.3/0.7, 0.31/0.7, 1
# gate [0.3, 0.6] (Eq. 5), inclusive -> 0, 0, 1, 1, 1, 0, 0
# smooth_gate s=0.1: smoothstep(x)=3x^2-2x^3 with x=(t-lo)/s+0.5 on the rising edge, (hi-t)/s+0.5 on the
#   falling one; t=0.29 -> x=0.4 -> 0.48-0.128=0.352; t=lo or hi -> x=0.5 -> 0.5; t=0.61 -> x=0.4 -> 0.352
# smooth_anneal tau=0.3 s=0.1 (h=0.05): u=t-tau; |u|<h -> (u+h)^2/(4h)/0.7:
#   t=0.29 -> 0.04^2/0.2/0.7 = 0.008/0.7; t=0.3 -> 0.05^2/0.2/0.7 = 0.0125/0.7; u>=h -> Eq. 4
# custom (0,0),(0.5,1),(1,0): 2t on [0, .5], 2(1-t) on [.5, 1] -> 0, .58, .6, .9, .8, .78, 0
EXPECTED = {
    ("anneal", ()): [0, 0, 0, 0.15 / 0.7, 0.3 / 0.7, 0.31 / 0.7, 1],
    ("gate", ()): [0, 0, 1, 1, 1, 0, 0],
    ("constant", ()): [1] * 7,
    ("none", ()): [0] * 7,
    ("smooth_gate", ()): [0, 0.352, 0.5, 1, 0.5, 0.352, 0],
    ("smooth_anneal", ()): [0, 0.008 / 0.7, 0.0125 / 0.7, 0.15 / 0.7, 0.3 / 0.7, 0.31 / 0.7, 1],
    ("custom", (("points", ((0, 0), (0.5, 1), (1, 0))),)): [0, 0.58, 0.6, 0.9, 0.8, 0.78, 0],
}


@pytest.mark.parametrize("key", list(EXPECTED), ids=[k[0] for k in EXPECTED])
def test_schedule_values_by_hand(key):
    name, params = key
    want = EXPECTED[key]
    for t, w in zip(TS, want):  # float in -> float out
        got = omega(name, t, **dict(params))
        assert isinstance(got, float)
        assert got == pytest.approx(w, abs=1e-9), (name, t)
    out = omega(name, torch.tensor(TS, dtype=torch.float64).reshape(7, 1), **dict(params))
    assert out.shape == (7, 1) and out.dtype == torch.float64
    assert torch.allclose(out.flatten(), torch.tensor(want, dtype=torch.float64), atol=1e-9)


def test_gate_edges_inclusive_in_float32_sigmas():
    t = torch.tensor([0.3, 0.6, 0.2999, 0.6001], dtype=torch.float32)
    assert omega("gate", t).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert omega("gate", t).dtype == torch.float32


def test_anneal_tau_parameter():
    assert omega("anneal", 0.6, tau=0.2) == pytest.approx(0.4 / 0.8)
    assert omega("anneal", 0.1, tau=0.0) == pytest.approx(0.1)


def test_bfloat16_input_is_computed_in_float32():
    out = omega("anneal", torch.tensor([1.0, 0.5], dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and out[0].item() == 1.0


@pytest.mark.parametrize("name,params", [("anneal", {"tau": 1.0}), ("anneal", {"tau": -0.1}),
                                         ("gate", {"lo": 0.7, "hi": 0.6}), ("gate", {"hi": 1.5}),
                                         ("smooth_gate", {"softness": 0.0}), ("constant", {"value": -1}),
                                         ("custom", {"points": [(0.5, 1), (0.2, 0)]}), ("custom", {"points": 3}),
                                         ("anneal", {"bogus": 1})])
def test_bad_parameters_raise_config_error(name, params):
    with pytest.raises(ConfigError):
        omega(name, 0.5, **params)
    with pytest.raises(ConfigError):
        Schedule(name, params)


def test_bad_times_and_names():
    with pytest.raises(InputError, match="divide it by 1000"):
        omega("gate", 500.0)
    with pytest.raises(InputError):
        omega("gate", torch.tensor([0.5, -0.2]))
    with pytest.raises(ConfigError, match="Unknown schedule"):
        omega("cosine", 0.5)
    assert omega("gate", 1.0 + 1e-7) == 0.0  # float32 rounding of sigma=1 is tolerated


def test_schedule_round_trips_dict_and_string():
    for s in [Schedule("gate"), Schedule("anneal", {"tau": 0.25}), Schedule("smooth_gate", {"softness": 0.05}),
              Schedule("custom", {"points": [(0, 0), (0.4, 1.0), (1, 0.5)]})]:
        assert Schedule.from_dict(s.to_dict()) == Schedule(s.name, s.full_params())
        again = Schedule.parse(s.to_str())
        assert [again(t) for t in TS] == [s(t) for t in TS]
    assert Schedule.parse("anneal(tau=0.2)").params == {"tau": 0.2}
    assert Schedule.parse("custom(0:0,0.5:1,1:0)")(0.45) == pytest.approx(0.9)
    assert Schedule.parse("gate")(0.45) == 1.0
    with pytest.raises(ConfigError):
        Schedule.parse("anneal(tau=abc)")


def test_task_presets_follow_the_paper():
    assert TASK_SCHEDULES["age"].to_dict() == {"name": "gate", "params": {"lo": 0.3, "hi": 0.6}}
    assert TASK_SCHEDULES["group"].name == "anneal"
    assert set(SCHEDULES) >= {"anneal", "gate", "constant", "none", "smooth_gate", "smooth_anneal", "custom"}


def test_plot_draws_curves_where_the_schedule_is():
    img = plot_schedules([Schedule("gate"), "none"], width=200, height=120)
    assert img.size == (200, 120) and img.mode == "RGB"
    left, right, top, bottom = 28, 192, 8, 100  # plot box of plot_schedules for this size
    x_in = round(left + (1 - 0.45) * (right - left))   # t = 0.45, inside the gate
    x_out = round(left + (1 - 0.9) * (right - left))   # t = 0.9, outside
    col_in = [img.getpixel((x_in, y)) for y in range(top - 1, top + 3)]
    col_out_top = [img.getpixel((x_out, y)) for y in range(top + 1, top + 3)]
    col_out_zero = [img.getpixel((x_out, y)) for y in range(bottom - 2, bottom + 2)]
    red, blue = plot_colour(0), plot_colour(1)
    assert red in col_in and red not in col_out_top
    assert red in col_out_zero or blue in col_out_zero  # both curves lie on y = 0 at t = 0.9
