"""A small HTTP server on 127.0.0.1 that speaks the documented part of ComfyUI's API.

Endpoints: ``POST /prompt`` (validates the graph's node types and model names against
its ``models/`` folder, as ComfyUI does, answering 400 with ``node_errors``; files in
subfolders are named by their relative path, ``stoker/x.safetensors``, as ComfyUI lists them), ``GET
/history/{prompt_id}``, ``GET /view``, ``POST /interrupt``, ``POST /queue`` (delete) and
a minimal ``GET /object_info``. Prompts run one at a time on a worker thread that
"renders" a real PNG whose colour depends on the seed and model names. Tests can hold
execution (`hold()` / `release()`) to cancel a running prompt, or make the next prompt
fail (`fail_next`).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import pathlib
import queue
import threading
import urllib.parse
import uuid
from typing import Any

KNOWN_NODES = {
    "CheckpointLoaderSimple", "LoraLoader", "VAELoader", "CLIPSetLastLayer", "CLIPTextEncode",
    "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
}
_MODEL_INPUTS = {"ckpt_name": "checkpoints", "lora_name": "loras", "vae_name": "vae"}
# The extensions ComfyUI lists in its model folders (folder_paths.supported_pt_extensions).
MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")
# KSampler's sampler_name and scheduler choices in ComfyUI (a subset of its list).
SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_sde", "dpmpp_2m",
                 "dpmpp_2m_sde", "ddim", "uni_pc", "deis", "lcm")
SCHEDULER_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")


class ComfyUIStub:
    """Start with `start()`; `url` is then the base URL. Use as a context manager to stop it."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.models_dir = root / "models"
        self.output_dir = root / "output"
        for sub in ("checkpoints", "loras", "vae"):
            (self.models_dir / sub).mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.history: dict[str, dict[str, Any]] = {}
        self.prompts: dict[str, dict[str, Any]] = {}  # every accepted graph, by prompt id
        self.interrupts: list[Any] = []
        self.deleted: list[str] = []
        self.fail_next: str | None = None  # exception message for the next prompt
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._gate = threading.Event()
        self._gate.set()
        self._interrupted = threading.Event()
        self.running = threading.Event()  # set while a prompt executes
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ComfyUIStub:
        for target in (lambda: self._server.serve_forever(poll_interval=0.05), self._work):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._gate.set()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> ComfyUIStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hold(self) -> None:
        """Make the next prompts wait, once running, until `release()` or an interrupt."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    # -- API ----------------------------------------------------------------------------

    def submit(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        graph = body.get("prompt")
        if not isinstance(graph, dict) or not graph:
            return 400, {"error": {"type": "no_prompt", "message": "No prompt provided"}, "node_errors": {}}
        node_errors: dict[str, Any] = {}
        for node_id, node in graph.items():
            errors = []
            if node.get("class_type") not in KNOWN_NODES:
                errors.append({"type": "invalid_prompt", "message": f"Cannot execute because node "
                               f"{node.get('class_type')} does not exist."})
            for field, folder in _MODEL_INPUTS.items():
                value = node.get("inputs", {}).get(field)
                if value is not None and value not in self._list(folder):
                    errors.append({"type": "value_not_in_list", "message": "Value not in list",
                                   "details": f"{field}: '{value}' not in {self._list(folder)}"})
            if node.get("class_type") == "KSampler":
                for field, choices in (("sampler_name", SAMPLER_NAMES), ("scheduler", SCHEDULER_NAMES)):
                    if node.get("inputs", {}).get(field) not in choices:
                        errors.append({"type": "value_not_in_list", "message": "Value not in list",
                                       "details": f"{field}: '{node['inputs'].get(field)}' not in {list(choices)}"})
            if errors:
                node_errors[node_id] = {"errors": errors, "class_type": node.get("class_type")}
        if node_errors:
            return 400, {"error": {"type": "prompt_outputs_failed_validation",
                                   "message": "Prompt outputs failed validation"}, "node_errors": node_errors}
        prompt_id = str(uuid.uuid4())
        self.prompts[prompt_id] = graph
        self._queue.put(prompt_id)
        return 200, {"prompt_id": prompt_id, "number": len(self.prompts), "node_errors": {}}

    def object_info(self) -> dict[str, Any]:
        return {
            "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [self._list("checkpoints")]}}},
            "LoraLoader": {"input": {"required": {"lora_name": [self._list("loras")]}}},
            "VAELoader": {"input": {"required": {"vae_name": [self._list("vae")]}}},
            "KSampler": {"input": {"required": {
                "sampler_name": [list(SAMPLER_NAMES)],
                "scheduler": [list(SCHEDULER_NAMES)]}}},
        }

    def interrupt(self, body: Any) -> None:
        self.interrupts.append(body)
        self._interrupted.set()
        self._gate.set()

    def delete(self, ids: list[str]) -> None:
        self.deleted.extend(ids)

    def _list(self, folder: str) -> list[str]:
        """The folder's model files, recursively, by relative path (broken links are not listed)."""
        root = self.models_dir / folder
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                      if p.is_file() and p.suffix in MODEL_EXTENSIONS)

    # -- execution ----------------------------------------------------------------------

    def _work(self) -> None:
        while (prompt_id := self._queue.get()) is not None:
            if prompt_id in self.deleted:
                continue
            self._interrupted.clear()
            self.running.set()
            self._gate.wait()
            self.running.clear()
            graph = self.prompts[prompt_id]
            if self._interrupted.is_set():
                self.history[prompt_id] = _entry(graph, {}, "error", [["execution_interrupted", {}]])
            elif self.fail_next is not None:
                message, self.fail_next = self.fail_next, None
                self.history[prompt_id] = _entry(graph, {}, "error", [["execution_error", {
                    "node_type": "KSampler", "exception_message": message}]])
            else:
                self.history[prompt_id] = _entry(graph, self._render(prompt_id, graph), "success", [])

    def _render(self, prompt_id: str, graph: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        latent = next(n["inputs"] for n in graph.values() if n["class_type"] == "EmptyLatentImage")
        sampler = next(n["inputs"] for n in graph.values() if n["class_type"] == "KSampler")
        names = [str(n["inputs"].get(k)) for n in graph.values() for k in _MODEL_INPUTS if k in n["inputs"]]
        save = next((node_id, n["inputs"]) for node_id, n in graph.items() if n["class_type"] == "SaveImage")
        subfolder = str(pathlib.PurePosixPath(save[1]["filename_prefix"]).parent).strip(".")
        folder = self.output_dir / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for index in range(int(latent.get("batch_size", 1))):  # ComfyUI saves one file per batch item
            seed_text = json.dumps([sampler["seed"], index, names, [n["inputs"].get("text") for n in graph.values()]])
            colour = tuple(hashlib.sha256(seed_text.encode()).digest()[:3])
            filename = f"{pathlib.PurePosixPath(save[1]['filename_prefix']).name}_{index + 1:05d}_.png"
            Image.new("RGB", (latent["width"], latent["height"]), colour).save(folder / filename, format="PNG")
            images.append({"filename": filename, "subfolder": subfolder, "type": "output"})
        return {save[0]: {"images": images}}

    def view(self, query: dict[str, list[str]]) -> bytes | None:
        filename = query.get("filename", [""])[0]
        subfolder = query.get("subfolder", [""])[0]
        path = (self.output_dir / subfolder / filename).resolve()
        if self.output_dir.resolve() not in path.parents or not path.is_file():
            return None
        return path.read_bytes()


def _entry(graph: dict[str, Any], outputs: dict[str, Any], status: str, messages: list[Any]) -> dict[str, Any]:
    return {"prompt": [0, "id", graph, {}, list(outputs)], "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages}}


def _handler(stub: ComfyUIStub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length) if length else b""
            return json.loads(raw) if raw else {}

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            path = urllib.parse.urlsplit(self.path).path
            if path == "/prompt":
                status, body = stub.submit(self._body())
                self._send(status, body)
            elif path == "/interrupt":
                stub.interrupt(self._body())
                self._send(200, b"", "text/plain")
            elif path == "/queue":
                stub.delete(list(self._body().get("delete", [])))
                self._send(200, b"", "text/plain")
            else:
                self._send(404, {"error": "not found"})

        def do_GET(self) -> None:  # noqa: N802
            parts = urllib.parse.urlsplit(self.path)
            if parts.path.startswith("/history/"):
                prompt_id = parts.path.removeprefix("/history/")
                entry = stub.history.get(prompt_id)
                self._send(200, {prompt_id: entry} if entry else {})
            elif parts.path == "/view":
                data = stub.view(urllib.parse.parse_qs(parts.query))
                if data is None:
                    self._send(404, {"error": "not found"})
                else:
                    self._send(200, data, "image/png")
            elif parts.path == "/object_info":
                self._send(200, stub.object_info())
            elif parts.path == "/system_stats":  # what the chart's readiness probe asks
                self._send(200, {"system": {"comfyui_version": "stub"}, "devices": []})
            else:
                self._send(404, {"error": "not found"})

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of PNG `data` (for assertions)."""
    from PIL import Image

    return Image.open(io.BytesIO(data)).size
