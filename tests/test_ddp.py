"""Two-process DDP on CPU (gloo): 2 SFT or DPO steps leave identical trainable weights on both ranks.

For DPO this also shows that the reference pass (the start copy swapped in; or, with dpo.reference=base,
adapter and LoRA switched off, peft toggling requires_grad) runs inside DDP without breaking gradient
synchronisation; ``dpo_seq`` back-propagates in two parts per micro-step. ``sft_gate`` injects with a gate
that is 0 for t < 0.5 (8 draws over 4 steps and 2 ranks): the residual is still computed there, so DDP
(find_unused_parameters=False) sees every adapter parameter used.

``accelerate launch --cpu --num_processes 2`` silently starts one process, and ``--multi_gpu`` without
``ACCELERATE_USE_CPU=true`` starts two unsynchronised ones; this is the combination that gives real DDP on
CPU. Run as a script (``test_ddp.py sft|dpo OUT``), this file is the per-rank worker.
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
COMMON = ["optim.max_steps=2", "data.synthetic=2", "run.tensorboard=false", "run.checkpoint_every=0"]


def _worker(trainer: str, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    overrides = [f"run.output_dir={out}", *COMMON]
    if trainer.startswith("sft"):
        from idglow_core.training import load_config, run_sft
        extra = ["loss.schedule=constant"] if trainer == "sft" else [
            "optim.max_steps=4", "loss.id_weight=0", "loss.schedule=gate(lo=0.5,hi=1.0)"]
        result = run_sft(load_config(ROOT / "train" / "configs" / "tiny_cpu.yaml", overrides + extra))
    else:
        from idglow_core.training.dpo import load_dpo_config, run_dpo
        extra = {"dpo": [], "dpo_seq": ["dpo.sequential=true"], "dpo_base": ["dpo.reference=base"]}[trainer]
        result = run_dpo(load_dpo_config(ROOT / "train" / "configs" / "dpo_tiny_cpu.yaml", overrides + extra))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    trained = {k: p.detach().clone().contiguous() for k, p in result.module.named_parameters() if p.requires_grad}
    save_file(trained, str(Path(out) / f"rank{rank}_of{world}.safetensors"))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["sft", "sft_gate", "dpo", "dpo_seq", "dpo_base"])
def test_two_process_ddp_keeps_ranks_identical(trainer, tmp_path):
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
           str(Path(__file__)), trainer, str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "run" / "rank0_of2.safetensors"))
    r1 = load_file(str(tmp_path / "run" / "rank1_of2.safetensors"))
    assert r0 and set(r0) == set(r1) and any(".lora_B." in k for k in r0)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # gradients were all-reduced
    assert any(r0[k].abs().sum() > 0 for k in r0 if k.endswith("to_out.weight"))  # and they trained
    assert (tmp_path / "run" / "final" / "idglow_adapter.safetensors").is_file()  # main process exported


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
