"""The cluster the CLI talks to: kubeconfig, context and namespace, as kubectl picks them (I/O)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from stoker import kube


class CliError(Exception):
    """A failure the CLI reports in one line and exits with `code`."""

    def __init__(self, message: str, *, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


EXIT_OK = 0
EXIT_FAILED = 1
"""The job failed, or the API server refused or could not be reached."""
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
"""--wait ran out of time (as timeout(1) exits)."""


@dataclasses.dataclass
class Cluster:
    api: client.ApiClient
    namespace: str
    objects: kube.Objects


def connect(*, kubeconfig: str | None, context: str | None, namespace: str | None) -> Cluster:
    """An API client for the chosen context (in a pod without a kubeconfig: the service account)."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        if path is None and not os.path.exists(os.path.expanduser(config.KUBE_CONFIG_DEFAULT_LOCATION)) \
                and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            api = client.ApiClient()
            ns = namespace or _incluster_namespace()
        else:
            cfg = client.Configuration()
            config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
            api = client.ApiClient(cfg)
            ns = namespace or _context_namespace(path, context)
    except (config.ConfigException, OSError) as exc:
        raise CliError(f"cannot load the kubeconfig: {exc}; set KUBECONFIG or pass --kubeconfig") from None
    return Cluster(api=api, namespace=ns, objects=kube.Objects(api, ns))


def _context_namespace(path: str | None, context: str | None) -> str:
    contexts, current = config.list_kube_config_contexts(config_file=path)
    chosen: dict[str, Any] | None = current
    if context:
        chosen = next((c for c in contexts if c.get("name") == context), None)
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def _incluster_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def explain(exc: ApiException, what: str) -> CliError:
    """One line for an API error about `what`."""
    if exc.status == 404:
        return CliError(f"{what} not found")
    if exc.status == 403:
        return CliError(f"forbidden: your identity may not access {what}; ask for RBAC on the stoker.dev resources")
    if exc.status == 409:
        return CliError(f"{what} already exists")
    if exc.status == 422:
        import json

        try:
            message = json.loads(exc.body).get("message", exc.reason)
        except (ValueError, TypeError, AttributeError):
            message = exc.reason
        return CliError(f"the API server refused {what}: {message}")
    return CliError(f"{what}: the API server answered {exc.status} {exc.reason}")
