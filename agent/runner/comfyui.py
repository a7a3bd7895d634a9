"""HTTP runner: drives a ComfyUI server running beside the agent through its documented API.

For each job the runner links the job's model files into the server's model folders
(`sync_model_folder`), queues a workflow graph with ``POST /prompt`` (checkpoint, LoRAs,
optional VAE, CLIP text encode, KSampler, VAE decode, SaveImage), polls
``GET /history/{prompt_id}`` until the prompt finished, and fetches the image with
``GET /view``. Cancellation deletes the prompt from the queue and ``POST /interrupt``s
it. The agent owns one subfolder of each model folder, ``stoker/`` (``checkpoints/stoker/``,
``loras/stoker/``, ``vae/stoker/``): there ComfyUI only ever sees files the agent's disk cache
has verified, under names derived from the model name and content hash, and workflows name
them ``stoker/<file>`` (ComfyUI lists model files in subfolders under such relative names).
The user's own files elsewhere in the model folders are never touched.

The agent runs this runner with ``--runner comfyui`` (env ``STOKER_RUNNER=comfyui``, chart
``agent.runner.kind: comfyui``); its settings are ``comfyui_url``, ``comfyui_models_dir``,
``comfyui_link`` (``symlink`` or ``copy``), ``comfyui_poll_interval_s`` and
``comfyui_timeout_s`` (flags ``--comfyui-url`` and so on, env ``STOKER_COMFYUI_URL`` and so
on). Symlinks point into the agent's disk cache, so the ComfyUI container must mount the
cache volume at the same path as the agent (the chart's sidecar does); ``copy`` needs no
shared path but doubles the disk used. The agent loads nothing into its own memory tiers for
this runner (`uses_loaded_weights` is false): ComfyUI loads the weights on the same GPU.

Files in the ``stoker/`` subfolders are pruned when the runner starts and after every job: a
link whose target the disk cache evicted, or a copy of an evicted file, is removed unless a
running job uses it. (A copy from an earlier run of the agent is removed too and copied again
when a job needs it: the runner cannot tell which cached file it came from.)

ComfyUI reports progress only over its websocket; this runner polls, so it reports
the last step when the prompt finishes. A batch comes back as one PNG with the images side
by side, as from the built-in runner.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import logging
import os
import pathlib
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import httpx

from stoker.agent.runner import base
from stoker.agent.runner.base import (
    ArtifactKind,
    GeneratedImage,
    GenerationRequest,
    LoadedArtifact,
    Reason,
    RunnerError,
)

log = logging.getLogger(__name__)

MODEL_SUBDIRS: Mapping[ArtifactKind, str] = {
    ArtifactKind.CHECKPOINT: "checkpoints",
    ArtifactKind.LORA: "loras",
    ArtifactKind.VAE: "vae",
}

# Stoker's sampler names → ComfyUI's KSampler `sampler_name` (every API sampler has one).
COMFY_SAMPLERS: Mapping[base.Sampler, str] = {
    base.Sampler.EULER: "euler",
    base.Sampler.EULER_A: "euler_ancestral",
    base.Sampler.HEUN: "heun",
    base.Sampler.DPM_2: "dpm_2",
    base.Sampler.DPM_2_A: "dpm_2_ancestral",
    base.Sampler.DPMPP_2M: "dpmpp_2m",
    base.Sampler.DPMPP_2M_SDE: "dpmpp_2m_sde",
    base.Sampler.LMS: "lms",
    base.Sampler.DDIM: "ddim",
    base.Sampler.UNIPC: "uni_pc",
    base.Sampler.DEIS: "deis",
    base.Sampler.LCM: "lcm",
}

OWN_SUBDIR = "stoker"
"""The subfolder of each ComfyUI model folder that belongs to the agent; nothing outside it is touched."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HEX12 = re.compile(r"^[0-9a-fA-F]{12}")


def model_filename(artifact: LoadedArtifact) -> str:
    """The file name of `artifact` in the agent's subfolder: the sanitised model name plus a
    content-hash tag. Pure."""
    stem = _UNSAFE.sub("_", artifact.name).strip("._")[:80] or "model"
    identity = artifact.sha256 if _HEX12.match(artifact.sha256) else hashlib.sha256(artifact.sha256.encode()).hexdigest()
    return f"{stem}-{identity[:12].lower()}.safetensors"


def own_folder(models_dir: pathlib.Path, kind: ArtifactKind) -> pathlib.Path:
    """Where the agent places files of `kind`: the ``stoker/`` subfolder of ComfyUI's folder for it."""
    return models_dir / MODEL_SUBDIRS[kind] / OWN_SUBDIR


def sync_model_folder(models_dir: pathlib.Path, artifacts: Iterable[LoadedArtifact], *,
                      link: str = "symlink") -> dict[str, str]:
    """Make every artifact's verified file visible in ComfyUI's `models_dir`; return sha256 → the
    name a workflow uses for it (``stoker/<file>``).

    Files appear under ``checkpoints/stoker/``, ``loras/stoker/`` and ``vae/stoker/`` with
    `model_filename` names (never a user-supplied path). `link` is ``symlink`` (no copy; the
    agent pins the cached file while the job runs) or ``copy`` (written to a temporary name,
    then renamed).
    """
    if link not in ("symlink", "copy"):
        raise ValueError(f"link must be 'symlink' or 'copy', not {link!r}")
    names = {}
    for artifact in artifacts:
        if artifact.path is None:
            raise RunnerError(Reason.BACKEND_FAILED,
                              f"{artifact.kind} {artifact.name!r} has no file in the disk cache to give ComfyUI")
        folder = own_folder(models_dir, artifact.kind)
        folder.mkdir(parents=True, exist_ok=True)
        name = model_filename(artifact)
        target = folder / name
        source = artifact.path.resolve()
        if link == "symlink":
            if not (target.is_symlink() and pathlib.Path(os.readlink(target)) == source):
                temporary = folder / f".{name}.{os.getpid()}.link"
                temporary.unlink(missing_ok=True)
                temporary.symlink_to(source)
                os.replace(temporary, target)
        elif not target.exists() or target.stat().st_size != source.stat().st_size:
            temporary = folder / f".{name}.{os.getpid()}.partial"
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)
        names[artifact.sha256] = f"{OWN_SUBDIR}/{name}"
    return names


def prune_model_folder(models_dir: pathlib.Path, *, keep: Iterable[str]) -> list[pathlib.Path]:
    """Remove the files in the agent's ``stoker/`` subfolders whose workflow names (``stoker/<file>``)
    are not in `keep`; return them. Files outside those subfolders are the user's and stay."""
    kept = set(keep)
    removed = []
    for kind in MODEL_SUBDIRS:
        folder = own_folder(models_dir, kind)
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in folder.iterdir():
            if (path.is_file() or path.is_symlink()) and f"{OWN_SUBDIR}/{path.name}" not in kept:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def build_workflow(request: GenerationRequest, *, checkpoint: str, loras: Sequence[tuple[str, float]],
                   vae: str | None, filename_prefix: str) -> dict[str, Any]:
    """The ComfyUI API-format graph for one text-to-image job. Pure."""
    sampler, schedule = base.check_request(request)
    graph: dict[str, Any] = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    model: list[Any] = ["1", 0]
    clip: list[Any] = ["1", 1]
    vae_out: list[Any] = ["1", 2]
    for index, (name, weight) in enumerate(loras):
        node = str(100 + index)
        graph[node] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": name, "strength_model": weight, "strength_clip": weight}}
        model, clip = [node, 0], [node, 1]
    if vae is not None:
        graph["2"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
        vae_out = ["2", 0]
    if request.clip_skip > 1:
        graph["3"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": clip,
                                                                   "stop_at_clip_layer": -request.clip_skip}}
        clip = ["3", 0]
    graph["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": request.prompt, "clip": clip}}
    graph["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": request.negative_prompt, "clip": clip}}
    graph["6"] = {"class_type": "EmptyLatentImage", "inputs": {
        "width": request.width, "height": request.height, "batch_size": request.batch_size}}
    graph["7"] = {"class_type": "KSampler", "inputs": {
        "seed": request.seed, "steps": request.steps, "cfg": request.cfg_scale,
        "sampler_name": COMFY_SAMPLERS[sampler], "scheduler": schedule.value, "denoise": 1.0,
        "model": model, "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0]}}
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": vae_out}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": filename_prefix}}
    return graph


@dataclasses.dataclass(frozen=True)
class ComfyUISettings:
    """How to reach the ComfyUI server and where its model folders are."""

    url: str = "http://127.0.0.1:8188"
    """Base URL of the server beside the agent."""
    models_dir: pathlib.Path = pathlib.Path("/comfyui/models")
    """ComfyUI's ``models/`` folder; the agent writes only in ``checkpoints/stoker/``, ``loras/stoker/`` and ``vae/stoker/``."""
    link: str = "symlink"
    """``symlink`` (the server must see the agent's cache at the same path) or ``copy`` model files into the folders."""
    poll_interval_s: float = 0.2
    """How often to ask ``GET /history`` whether the prompt finished."""
    timeout_s: float = 600.0
    """A prompt not finished this long after queueing is interrupted and fails (retryable)."""
    request_timeout_s: float = 30.0
    """Timeout of one HTTP request to the server."""


class ComfyUIRunner:
    """A `Runner` backed by a ComfyUI server."""

    uses_loaded_weights = False  # ComfyUI reads the files and loads its own copy on the GPU

    def __init__(self, settings: ComfyUISettings, *, client: httpx.Client | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._client = client or httpx.Client(base_url=settings.url, timeout=settings.request_timeout_s)
        self._sleep = sleep
        self.client_id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._in_use: collections.Counter[str] = collections.Counter()  # workflow names of running jobs' files
        self._sources: dict[str, pathlib.Path] = {}  # workflow name -> the cached file it came from
        self.prune()

    def close(self) -> None:
        self._client.close()

    def prune(self) -> list[pathlib.Path]:
        """Remove placed files whose cached file is gone (evicted), unless a running job uses them."""
        with self._lock:
            keep = set(self._in_use)
            keep.update(name for name, source in self._sources.items() if source.exists())
            for kind in MODEL_SUBDIRS:
                folder = own_folder(self.settings.models_dir, kind)
                if folder.is_dir():  # links from an earlier run whose target is still cached
                    keep.update(f"{OWN_SUBDIR}/{p.name}" for p in folder.iterdir() if p.is_symlink() and p.exists())
            try:
                removed = prune_model_folder(self.settings.models_dir, keep=keep)
            except OSError as error:
                log.warning("could not prune ComfyUI's model folder %s: %s", self.settings.models_dir, error)
                return []
            for path in removed:
                self._sources.pop(f"{OWN_SUBDIR}/{path.name}", None)
        if removed:
            log.info("removed %d model file(s) from %s that the disk cache no longer holds", len(removed),
                     self.settings.models_dir)
        return removed

    def generate(
        self,
        *,
        checkpoint: LoadedArtifact,
        loras: Sequence[LoadedArtifact],
        vae: LoadedArtifact | None,
        request: GenerationRequest,
        on_step: Callable[[int, int], None],
        should_cancel: Callable[[], bool],
    ) -> GeneratedImage:
        base.check_request(request)  # refuse bad parameters before touching the model folder
        artifacts = [checkpoint, *loras, *([vae] if vae else [])]
        with self._lock:
            try:
                names = sync_model_folder(self.settings.models_dir, artifacts, link=self.settings.link)
            except OSError as error:
                raise RunnerError(Reason.BACKEND_FAILED,
                                  f"cannot place model files in ComfyUI's folder {self.settings.models_dir}: "
                                  f"{error.strerror or error}; mount it writable for the agent") from None
            placed = [names[a.sha256] for a in artifacts]
            self._in_use.update(placed)
            for artifact in artifacts:
                assert artifact.path is not None  # sync_model_folder refused artifacts without a file
                self._sources[names[artifact.sha256]] = artifact.path.resolve()
        try:
            prefix = f"stoker/{uuid.uuid4().hex}"
            graph = build_workflow(request, checkpoint=names[checkpoint.sha256],
                                   loras=[(names[lora.sha256], lora.weight) for lora in loras],
                                   vae=names[vae.sha256] if vae else None, filename_prefix=prefix)
            if should_cancel():
                raise RunnerError(Reason.CANCELLED, "cancelled before the prompt was queued")
            prompt_id = self._queue(graph)
            entry = self._wait(prompt_id, should_cancel)
            images = self._fetch_images(prompt_id, entry)
        finally:
            with self._lock:
                for name in placed:
                    self._in_use[name] -= 1
                    if self._in_use[name] <= 0:
                        del self._in_use[name]
            self.prune()
        on_step(request.steps, request.steps)
        parameters = base.format_parameters(request, model=checkpoint.name, loras=loras,
                                            vae=vae.name if vae else None, model_hash=checkpoint.sha256)
        return _with_parameters(images, parameters)

    # -- HTTP ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise RunnerError(Reason.BACKEND_UNAVAILABLE,
                              f"ComfyUI at {self.settings.url} is unreachable ({type(error).__name__}); "
                              "check that the server beside the agent is running", retryable=True) from None

    def _queue(self, graph: Mapping[str, Any]) -> str:
        response = self._call("POST", "/prompt", json={"prompt": graph, "client_id": self.client_id})
        if response.status_code == 400:
            raise RunnerError(Reason.INVALID_PARAMETERS,
                              f"ComfyUI refused the workflow: {_describe_refusal(response)}")
        if not response.is_success:
            raise RunnerError(Reason.BACKEND_FAILED, f"ComfyUI answered POST /prompt with {response.status_code}",
                              retryable=response.status_code >= 500)
        prompt_id = response.json().get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            raise RunnerError(Reason.BACKEND_FAILED, "ComfyUI accepted the workflow but returned no prompt_id")
        log.info("queued ComfyUI prompt %s", prompt_id)
        return prompt_id

    def _cancel(self, prompt_id: str) -> None:
        self._call("POST", "/queue", json={"delete": [prompt_id]})
        self._call("POST", "/interrupt", json={"prompt_id": prompt_id})
        log.info("cancelled ComfyUI prompt %s", prompt_id)

    def _wait(self, prompt_id: str, should_cancel: Callable[[], bool]) -> Mapping[str, Any]:
        deadline = time.monotonic() + self.settings.timeout_s
        while True:
            if should_cancel():
                self._cancel(prompt_id)
                raise RunnerError(Reason.CANCELLED, f"cancelled while ComfyUI ran prompt {prompt_id}")
            response = self._call("GET", f"/history/{prompt_id}")
            if response.is_success:
                entry = response.json().get(prompt_id)
                if entry:  # a prompt appears in the history once it has finished, well or not
                    status = entry.get("status") or {}
                    if status.get("status_str", "success") == "success":
                        return entry
                    raise _execution_error(prompt_id, status)
            if time.monotonic() > deadline:
                self._cancel(prompt_id)
                raise RunnerError(Reason.BACKEND_FAILED,
                                  f"ComfyUI did not finish prompt {prompt_id} within {self.settings.timeout_s:.0f}s",
                                  retryable=True)
            self._sleep(self.settings.poll_interval_s)

    def _fetch_images(self, prompt_id: str, entry: Mapping[str, Any]) -> list[bytes]:
        """Every output image of the prompt, in ComfyUI's order (a batch gives several)."""
        images = [image for node in entry.get("outputs", {}).values() for image in node.get("images", [])
                  if image.get("type") == "output"]
        if not images:
            raise RunnerError(Reason.BACKEND_FAILED, f"ComfyUI prompt {prompt_id} finished without an output image")
        fetched = []
        for image in images:
            response = self._call("GET", "/view", params={
                "filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": "output"})
            if not response.is_success:
                raise RunnerError(Reason.BACKEND_FAILED,
                                  f"ComfyUI answered GET /view for prompt {prompt_id} with {response.status_code}")
            fetched.append(response.content)
        return fetched


def _describe_refusal(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    parts = [str(body.get("error", {}).get("message", ""))]
    for node, errors in (body.get("node_errors") or {}).items():
        for error in errors.get("errors", []):
            parts.append(f"node {node} ({errors.get('class_type', '?')}): {error.get('message')} "
                         f"{error.get('details', '')}".strip())
    return "; ".join(p for p in parts if p)[:1000]


def _execution_error(prompt_id: str, status: Mapping[str, Any]) -> RunnerError:
    message = "no details"
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            message = f"{data.get('node_type', '?')}: {data.get('exception_message', '').strip()}"
        elif kind == "execution_interrupted":
            message = "interrupted on the server"
    if "out of memory" in message.lower():
        return RunnerError(Reason.INSUFFICIENT_VRAM, f"ComfyUI ran out of GPU memory on prompt {prompt_id}: {message}",
                           retryable=True)
    return RunnerError(Reason.BACKEND_FAILED, f"ComfyUI failed prompt {prompt_id}: {message}")


def _with_parameters(pngs: Sequence[bytes], parameters: str) -> GeneratedImage:
    """Re-save ComfyUI's PNGs as one, with our `parameters` chunk (its own chunks name server-side files)."""
    from PIL import Image

    opened = []
    for png in pngs:
        try:
            image = Image.open(io.BytesIO(png))
            image.load()
        except OSError as error:
            raise RunnerError(Reason.BACKEND_FAILED, f"ComfyUI returned an unreadable image: {error}") from None
        opened.append(image.convert("RGB"))
    return base.encode_png(opened, parameters=parameters)
