"""Two-process DDP on CPU (gloo) for DPO: the reference pass (adapter and LoRA switched off, peft toggling
requires_grad) runs inside DDP without breaking gradient synchronisation; both ranks end with identical
trainable weights. Run as a script, this file is the per-rank worker (see test_sft_ddp.py for the launch
flags that give real DDP on CPU)."""
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

    from idglow_core.training.dpo import load_dpo_config, run_dpo

    cfg = load_dpo_config(ROOT / "train" / "configs" / "dpo_tiny_cpu.yaml",
                          [f"run.output_dir={out}", "optim.max_steps=2", "data.synthetic=2", "run.tensorboard=false",
                           "run.checkpoint_every=0"])
    result = run_dpo(cfg)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    trained = {k: p.detach().clone().contiguous() for k, p in result.module.named_parameters() if p.requires_grad}
    save_file(trained, str(Path(out) / f"rank{rank}_of{world}.safetensors"))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


@pytest.mark.slow
def test_two_process_ddp_dpo_keeps_ranks_identical(tmp_path):
    import torch
    from safetensors.torch import load_file

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    with socket.socket() as sock:
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
    assert r0 and set(r0) == set(r1) and any(".lora_B." in k for k in r0)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # gradients were all-reduced
    assert any(r0[k].abs().sum() > 0 for k in r0 if k.endswith("to_out.weight"))  # and they trained
    assert (tmp_path / "run" / "final" / "idglow_adapter.safetensors").is_file()


if __name__ == "__main__":
    _worker(sys.argv[1])
