"""train/sft.py as a user runs it: bf16 autocast, gradient checkpointing, EMA, TensorBoard, exit codes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(ROOT / "train" / "sft.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_in_bf16_and_refuses_to_overwrite(tmp_path):
    from idglow_core.adapter import IdGlowAdapter

    out = tmp_path / "run"
    common = ["--config", "train/configs/tiny_cpu.yaml", "--output-dir", str(out), "--max-steps", "2",
              "--mixed-precision", "bf16", "--gradient-checkpointing", "--train", "adapter",
              "--set", "data.synthetic=2", "--set", "optim.ema_decay=0.9", "--schedule", "constant"]
    proc = _run(*common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed precision bf16" in proc.stderr
    adapter = IdGlowAdapter.load(out / "final" / "idglow_adapter.safetensors")
    assert adapter.config.id_dim == 128  # dlib embeddings in the tiny config
    assert all(p.dtype == torch.float32 for p in adapter.parameters())  # trainable weights stay fp32
    assert any(p.abs().sum() > 0 for n, p in adapter.named_parameters() if n.endswith("to_out.weight"))
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    again = _run(*common)
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr
    assert "--resume latest" in again.stderr and "--overwrite" in again.stderr
