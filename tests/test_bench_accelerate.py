"""``bench run`` under ``accelerate launch`` with two processes (CPU, gloo): each rank generates its own slice,
the ranks wait for each other and rank 0 alone writes the manifests. Run as a script, this file is the per-rank
worker: the CLI's ``bench run`` with the method swapped for a weight-free one that records its rank.
(``--multi_gpu`` with ``ACCELERATE_USE_CPU=true`` is the combination that starts two synchronised CPU ranks.)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class RankStamp:
    """Writes a small image whose file name is the row and whose sidecar names the rank that made it."""

    def generate(self, row, out_path):
        from PIL import Image

        Image.new("RGB", (8, 8), (255, 0, 0)).save(out_path)
        out_path.with_suffix(".rank").write_text(os.environ.get("RANK", "?"))


def _worker(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    from idglow_core.cli import bench as bench_cli
    from idglow_core.cli import main

    bench_cli._method = lambda args, rank: RankStamp()
    return main(["bench", "run", *argv])


@pytest.mark.slow
def test_two_ranks_split_the_rows_and_rank_zero_writes_the_manifest(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    refs = tmp_path / "r.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(refs)
    rows = [{"id": f"row{i}", "refs": ["r.png", "r.png"], "task": "group", "prompt_mode": "static", "prompt": "p",
             "seed": i} for i in range(5)]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", port, str(Path(__file__)),
           "--manifest", str(bench), "--method", "stamp", "--model", "unused"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = tmp_path / "runs" / "stamp" / "images"
    made = {p.stem: p.read_text() for p in images.glob("*.rank")}
    assert made == {"row0": "0", "row1": "1", "row2": "0", "row3": "1", "row4": "0"}
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')]
    assert sorted((r["rank"], r["world"], r["done"]) for r in reports) == [(0, 2, 3), (1, 2, 2)]
    listed = [json.loads(line) for line in (tmp_path / "runs" / "stamp" / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in listed] == [f"row{i}" for i in range(5)]  # written after both ranks finished
    assert proc.stdout.count("images listed in") == 1                  # by rank 0 only


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
