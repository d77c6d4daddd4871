"""Any ComfyUI workflow as a benchmark method, through a running server's HTTP API (stdlib only).

The mapping file (YAML or JSON) names which nodes of an API-format workflow ("Export (API)") take what::

    workflow: group_api.json            # API-format prompt, relative to this file
    refs: ["10", "11"]                  # LoadImage node ids, reference order (Picture 1, 2, ...)
    prompt: {node: "6", input: "text"}  # optional: where the row's prompt goes
    seed: {node: "3", input: "seed"}    # optional: where the row's seed goes
    output: "9"                         # the node whose output image is downloaded (SaveImage)

or ``variants: [<mapping>, ...]``: the variant whose ``refs`` count equals the row's k is used (a row with no
variant is skipped and counted). Per row: each reference is uploaded once (``POST /upload/image``, named by
its content hash), the graph is queued (``POST /prompt``), ``GET /history/<id>`` is polled until it finishes,
and the output image is fetched with ``GET /view`` and written next to the bench manifest.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import ConfigError, ServerError
from ..images import save_image_atomic
from ..yamlfile import read_yaml_mapping
from .run import BenchRow, RowSkipped

__all__ = ["WorkflowMapping", "read_mapping", "ComfyClient", "ComfyMethod"]

log = logging.getLogger("idglow")


@dataclass(frozen=True)
class WorkflowMapping:
    """One API-format graph and where the row's references, prompt, seed and output are."""

    graph: dict
    refs: tuple[str, ...]
    output: str
    prompt: tuple[str, str] | None = None
    seed: tuple[str, str] | None = None


def _slot(spec, key: str, where: str, graph: dict) -> tuple[str, str] | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or not {"node", "input"} <= set(spec):
        raise ConfigError(f"{where}: '{key}' must be {{node: ID, input: NAME}}, got {spec!r}.")
    node = str(spec["node"])
    if node not in graph:
        raise ConfigError(f"{where}: '{key}' names node {node}, which is not in the workflow.")
    return node, str(spec["input"])


def _parse_variant(raw: dict, folder: Path, where: str) -> WorkflowMapping:
    wf = raw.get("workflow")
    if not isinstance(wf, str):
        raise ConfigError(f"{where}: 'workflow' must name an API-format workflow JSON file.")
    path = folder / wf
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read workflow '{path}' ({exc}). Save it with 'Export (API)'.") from exc
    if not isinstance(graph, dict) or not all(isinstance(v, dict) and "class_type" in v for v in graph.values()):
        raise ConfigError(f"{where}: '{path}' is not an API-format workflow (node id -> {{class_type, inputs}}); "
                          f"the UI format needs 'Export (API)' first.")
    refs = raw.get("refs")
    if not isinstance(refs, list) or not refs:
        raise ConfigError(f"{where}: 'refs' must list the LoadImage node ids, in reference order.")
    refs = tuple(str(r) for r in refs)
    bad = [r for r in refs if graph.get(r, {}).get("class_type") != "LoadImage"]
    if bad:
        raise ConfigError(f"{where}: refs {bad} are not LoadImage nodes of the workflow.")
    output = str(raw.get("output", ""))
    if output not in graph:
        raise ConfigError(f"{where}: 'output' must be the id of the node whose image is kept (e.g. SaveImage).")
    return WorkflowMapping(graph, refs, output, _slot(raw.get("prompt"), "prompt", where, graph),
                           _slot(raw.get("seed"), "seed", where, graph))


def read_mapping(path: str | os.PathLike) -> dict[int, WorkflowMapping]:
    """``{k: mapping}`` from a mapping file (one mapping, or ``variants``)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "Workflow mapping", "the README's Benchmark section")
    variants = raw.get("variants", [raw])
    out: dict[int, WorkflowMapping] = {}
    for i, v in enumerate(variants):
        m = _parse_variant(v, path.parent, f"{path} variant {i}" if "variants" in raw else str(path))
        if len(m.refs) in out:
            raise ConfigError(f"{path}: two variants take {len(m.refs)} references; keep one per k.")
        out[len(m.refs)] = m
    return out


class ComfyClient:
    """The few ComfyUI routes a benchmark needs. ``url``: e.g. ``http://127.0.0.1:8188``."""

    def __init__(self, url: str, timeout: float = 600.0, poll: float = 0.1):
        self.url, self.timeout, self.poll = url.rstrip("/"), timeout, poll
        self.client_id = str(uuid.uuid4())

    def _request(self, route: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        req = urllib.request.Request(self.url + route, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", "replace")[:2000]
            raise ServerError(f"ComfyUI {route} answered HTTP {exc.code}: {body}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"Cannot reach ComfyUI at {self.url} ({exc}). Start it, or pass the right "
                              f"--comfy-url.") from exc

    def upload(self, path: Path) -> str:
        """Upload an image into ComfyUI's input folder; returns the name LoadImage takes."""
        data = path.read_bytes()
        name = f"idglow_{hashlib.sha1(data).hexdigest()[:16]}{path.suffix.lower()}"
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n",
                 f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode(),
                 f"--{boundary}--\r\n".encode()]
        reply = json.loads(self._request("/upload/image", b"".join(parts),
                                         {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else reply["name"]

    def queue(self, graph: dict) -> str:
        body = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        reply = json.loads(self._request("/prompt", body, {"Content-Type": "application/json"}))
        return reply["prompt_id"]

    def wait(self, prompt_id: str) -> dict:
        """Poll ``/history/<id>`` until the prompt finished; return its outputs (ServerError on failure)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            hist = json.loads(self._request(f"/history/{prompt_id}")).get(prompt_id)
            status = (hist or {}).get("status", {})
            if status.get("completed") or status.get("status_str") == "success":
                return hist["outputs"]
            if status.get("status_str") == "error":
                errors = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                raise ServerError(f"ComfyUI prompt {prompt_id} failed: {json.dumps(errors)[:2000]}")
            time.sleep(self.poll)
        raise ServerError(f"ComfyUI prompt {prompt_id} did not finish within {self.timeout:.0f} s. Raise "
                          f"--comfy-timeout or check the server's queue.")

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")


class ComfyMethod:
    """Generates a bench row with a ComfyUI workflow (see the module doc)."""

    def __init__(self, client: ComfyClient, mappings: dict[int, WorkflowMapping], name: str = "comfy"):
        self.client, self.mappings, self.name = client, mappings, name
        self._uploaded: dict[Path, str] = {}

    def _upload(self, path: Path) -> str:
        if path not in self._uploaded:
            self._uploaded[path] = self.client.upload(path)
        return self._uploaded[path]

    def graph_for(self, row: BenchRow) -> tuple[dict, WorkflowMapping]:
        """The row's graph: references, prompt and seed filled in; output node's prefix set to the row id."""
        mapping = self.mappings.get(len(row.refs))
        if mapping is None:
            raise RowSkipped(f"the workflow mapping has no variant for k = {len(row.refs)} references "
                             f"(it has k = {sorted(self.mappings)})")
        graph = copy.deepcopy(mapping.graph)
        for node, ref in zip(mapping.refs, row.refs):
            graph[node]["inputs"]["image"] = self._upload(ref)
        for slot, value in ((mapping.prompt, row.prompt), (mapping.seed, row.seed)):
            if slot is not None:
                graph[slot[0]]["inputs"][slot[1]] = value
        if "filename_prefix" in graph[mapping.output].get("inputs", {}):
            graph[mapping.output]["inputs"]["filename_prefix"] = f"idglow_bench/{self.name}/{row.id}"
        return graph, mapping

    def generate(self, row: BenchRow, out_path: Path) -> None:
        graph, mapping = self.graph_for(row)
        outputs = self.client.wait(self.client.queue(graph))
        images = outputs.get(mapping.output, {}).get("images") or []
        if not images:
            raise ServerError(f"row {row.id}: output node {mapping.output} produced no image "
                              f"(outputs: {sorted(outputs)}). Point 'output' at a SaveImage node.")
        with Image.open(io.BytesIO(self.client.view(images[0]))) as img:
            save_image_atomic(img.convert("RGB"), out_path)
