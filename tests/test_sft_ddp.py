"""Two-process DDP on CPU (gloo): 2 SFT steps leave identical trainable weights on both ranks.

``accelerate launch --cpu --num_processes 2`` silently starts one process, and ``--multi_gpu`` without
``ACCELERATE_USE_CPU=true`` starts two unsynchronised ones; this is the combination that gives real DDP on
CPU. Run as a script, this file is the per-rank worker.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _worker(out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from idglow_core.training import load_config
    from idglow_core.training.sft import run_sft

    cfg = load_config(ROOT / "train" / "configs" / "tiny_cpu.yaml",
                      [f"run.output_dir={out}", "optim.max_steps=2", "data.synthetic=2", "run.tensorboard=false",
                       "loss.schedule=constant", "run.checkpoint_every=0"])
    result = run_sft(cfg)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trained = {k: p.detach().clone().contiguous() for k, p in result.module.named_parameters() if p.requires_grad}
    save_file(trained, str(Path(out) / f"rank{rank}_of{world}.safetensors"))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    import torch
    from safetensors.torch import load_file

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    with socket.socket() as sock:  # a free port, so parallel runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           str(Path(__file__)), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "run" / "rank0_of2.safetensors"))
    r1 = load_file(str(tmp_path / "run" / "rank1_of2.safetensors"))
    assert r0 and set(r0) == set(r1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # gradients were all-reduced
    assert any(r0[k].abs().sum() > 0 for k in r0 if k.endswith("to_out.weight"))  # and they trained
    assert (tmp_path / "run" / "final" / "idglow_adapter.safetensors").is_file()  # main process exported


if __name__ == "__main__":
    _worker(sys.argv[1])
