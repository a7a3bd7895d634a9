"""Thin helpers over the Kubernetes client shared by the operator and the agent (I/O)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from typing import Any

import urllib3.exceptions
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from stoker.api import GROUP, VERSION

log = logging.getLogger(__name__)

PLURALS = {"ModelCache": "modelcaches", "GenerationJob": "generationjobs", "CacheAgent": "cacheagents"}

REQUEST_TIMEOUT_S: tuple[float, float] = (5.0, 30.0)
"""(connect, read) seconds of one API request. Without a read timeout a half-open connection
blocks the calling thread for good; with it the call fails and the caller retries."""
WATCH_READ_MARGIN_S = 10.0
"""A watch's read timeout is its server-side timeout_seconds plus this margin."""


def now_rfc3339(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A client from an explicit kubeconfig, $KUBECONFIG, or the in-cluster service account."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        return config.new_client_from_config(config_file=path)
    config.load_incluster_config()
    return client.ApiClient()


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 409


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


def is_transient(exc: BaseException) -> bool:
    """Whether repeating the API call may succeed: overload, server errors, timeouts, dropped connections
    (urllib3's MaxRetryError while the API server restarts)."""
    if isinstance(exc, ApiException):
        return exc.status in (None, 0, 408, 429, 500, 502, 503, 504)
    return isinstance(exc, (urllib3.exceptions.HTTPError, OSError, TimeoutError))


class Objects:
    """Get, list and merge-patch Stoker custom objects in one namespace.

    Every call carries `request_timeout` ((connect, read) seconds), so a hung connection
    fails the call instead of blocking its thread forever.
    """

    def __init__(self, api: client.ApiClient, namespace: str, *,
                 request_timeout: tuple[float, float] = REQUEST_TIMEOUT_S) -> None:
        self.namespace = namespace
        self.request_timeout = request_timeout
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[kind], name,
                                                        _request_timeout=self.request_timeout)

    def list(self, kind: str, *, label_selector: str = "") -> dict[str, Any]:
        return self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURALS[kind], label_selector=label_selector,
            _request_timeout=self.request_timeout)

    def create(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[kind], body,
                                                           _request_timeout=self.request_timeout)

    def patch(self, kind: str, name: str, body: dict[str, Any], *, resource_version: str | None = None) -> dict[str, Any]:
        """Merge-patch the main resource; with resource_version, fail with 409 if it changed."""
        if resource_version is not None:
            body = {**body, "metadata": {**body.get("metadata", {}), "resourceVersion": resource_version}}
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[kind], name, body,
                                                          _request_timeout=self.request_timeout)

    def patch_status(self, kind: str, name: str, status: dict[str, Any], *,
                     resource_version: str | None = None) -> dict[str, Any]:
        """Merge-patch the status subresource; with resource_version, fail with 409 if it changed."""
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        return self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURALS[kind], name, body, _request_timeout=self.request_timeout)

    def delete(self, kind: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[kind], name,
                                                    _request_timeout=self.request_timeout)

    def event(self, obj: dict[str, Any], *, reason: str, message: str, warning: bool = False,
              component: str = "stoker") -> None:
        """Record a core/v1 Event on `obj`; failures are logged, never raised."""
        meta = obj.get("metadata", {})
        ts = dt.datetime.now(dt.timezone.utc)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{meta.get('name', 'x')}.{uuid.uuid4().hex[:12]}",
                                         namespace=self.namespace),
            involved_object=client.V1ObjectReference(
                api_version=obj.get("apiVersion"), kind=obj.get("kind"), name=meta.get("name"),
                namespace=self.namespace, uid=meta.get("uid"), resource_version=meta.get("resourceVersion")),
            reason=reason, message=message[:1024], type="Warning" if warning else "Normal",
            first_timestamp=ts, last_timestamp=ts, count=1,
            source=client.V1EventSource(component=component),
        )
        try:
            self.core.create_namespaced_event(self.namespace, event, _request_timeout=self.request_timeout)
        except ApiException as exc:  # events are best-effort; never fail the caller
            log.warning("could not record event %s on %s/%s: %s", reason, self.namespace, meta.get("name"), exc.reason)


def stream_events(list_fn: Any, *, stop: Any, on_event: Any, timeout_s: int = 30,
                  request_timeout: tuple[float, float] = REQUEST_TIMEOUT_S, **kwargs: Any) -> None:
    """Watch `list_fn` (a namespaced list call) until `stop.is_set()`, calling
    `on_event(type, object)` for every event. Relists after errors and 410 Gone, and
    replays the list as ADDED events so callers see the full state after a gap.

    The listing has `request_timeout`; each watch request ends on the server after
    `timeout_s` and on the client when nothing arrived for `timeout_s` + WATCH_READ_MARGIN_S
    (bookmarks keep a quiet watch talking), so a dead connection is noticed and replaced.

    Blocking: run it in a thread.
    """
    from kubernetes import watch

    watch_timeout = (request_timeout[0], timeout_s + WATCH_READ_MARGIN_S)
    resource_version = ""
    while not stop.is_set():
        try:
            if not resource_version:
                listing = list_fn(_request_timeout=request_timeout, **kwargs)
                for item in listing.get("items", []):
                    on_event("ADDED", item)
                resource_version = listing["metadata"]["resourceVersion"]
            w = watch.Watch()
            for event in w.stream(list_fn, resource_version=resource_version, timeout_seconds=timeout_s,
                                  allow_watch_bookmarks=True, _request_timeout=watch_timeout, **kwargs):
                if stop.is_set():
                    w.stop()
                    break
                obj = event["object"]
                if event["type"] == "ERROR":
                    resource_version = ""  # 410 Gone or similar: relist
                    break
                resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                if event["type"] != "BOOKMARK":
                    on_event(event["type"], obj)
        except ApiException as exc:
            if exc.status == 410:
                resource_version = ""
            else:
                log.warning("watch failed (%s %s); retrying", exc.status, exc.reason)
                stop.wait(1.0)
        except Exception as exc:  # connection drops: retry, never die silently
            log.warning("watch interrupted (%s); retrying", exc)
            resource_version = ""
            stop.wait(1.0)
