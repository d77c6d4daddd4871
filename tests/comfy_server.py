"""A real ComfyUI server for tests and tools: ``main.py`` of ``COMFYUI_DIR`` on 127.0.0.1, a free port, CPU.

The server gets its own ``--base-directory`` (custom_nodes/, models/, input/, output/, user/ under a temporary
folder) with this checkout linked in as ``custom_nodes/ComfyUI-IdGlow``, so a copy of the pack installed in
ComfyUI's own custom_nodes/ is never loaded beside it. Stopped by the PID it was started with.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-IdGlow"
READY_NODE = "IdGlowFaceSim"  # answered by /object_info/<node> once the pack is loaded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``with ComfyServer(comfy_dir) as server: server.get("/queue")``.

    base: the base directory (a new temporary folder when None). with_pack: link this checkout into its
    custom_nodes/ (False: core nodes only). ``server.url`` is ``http://127.0.0.1:<port>``.
    """

    def __init__(self, comfy_dir: Path, base: Path | None = None, timeout: float = 180.0, with_pack: bool = True):
        self.comfy_dir = Path(comfy_dir)
        self.base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="idglow_comfy_base_"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.with_pack = with_pack
        self.ready_path = f"/object_info/{READY_NODE if with_pack else 'SaveImage'}"

    def __enter__(self) -> "ComfyServer":
        for sub in ("custom_nodes", "models", "input", "output", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if self.with_pack and not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                 "--disable-api-nodes", "--disable-auto-launch", "--base-directory", str(self.base),
                 "--database-url", "sqlite:///:memory:"],
                cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log()[-3000:]}")
            try:
                self.get(self.ready_path)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"ComfyUI did not answer within {self.timeout:.0f} s:\n{self.log()[-3000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else {}

    def upload_image(self, path: Path, name: str | None = None) -> str:
        """POST /upload/image (multipart field ``image``); returns the stored name."""
        name = name or Path(path).name
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + Path(path).read_bytes() + \
            f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.url + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["name"]

    def put_model(self, folder: str, src: Path) -> Path:
        """Copy a file into ``models/<folder>/`` of this server's base directory."""
        dst = self.base / "models" / folder / Path(src).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        return dst
