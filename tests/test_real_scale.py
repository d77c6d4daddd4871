"""The real-scale proof's code path (issue 12, point 10) at reduced depth and width on CPU: the same script
(``bench/real_scale.py``) that runs the 60-block, 3072-wide 2511 DiT on a GPU.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("idglow_bench_real_scale", ROOT / "bench" / "real_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_depth_defaults_are_the_2511_config():
    args = _bench().parse_args([])
    assert (args.layers, args.heads * args.head_dim, args.joint_dim, args.vae, args.resolution) == \
        (60, 3072, 3584, "real", 1024)


def test_reduced_run_covers_every_phase():
    bench = _bench()
    report = bench.main(["--layers", "1", "--heads", "2", "--head-dim", "16", "--joint-dim", "16", "--vae", "tiny",
                         "--resolution", "32", "--prompt-tokens", "6", "--lora-rank", "2", "--device", "cpu",
                         "--dtype", "fp32"])
    phases = report["phases"]
    assert phases["build"]["trainable_params_m"] > 0
    assert phases["sft"]["id_loss_ran"] == 1  # the ID loss ran on the decoded one-step estimate
    for name in ("sft", "dpo_joint"):
        assert math.isfinite(phases[name]["loss"]) and phases[name]["seconds"] > 0
        assert phases[name]["peak_rss_gb_so_far"] > 0
    seq = phases["dpo_sequential"]
    supported, reason = bench.dpo_sequential_supported()
    assert (math.isfinite(seq["loss"]) if supported else seq == {"skipped": reason})
    assert phases["inference_adapter"]["finite"] and phases["inference_plain"]["finite"]
