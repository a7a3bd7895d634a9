"""Model-source credentials from Secrets, without giving the agent broad Secret access (I/O).

A ModelCache's `spec.source.secretRef` names a Secret, a key and an HTTP header. The agent
looks the value up, in this order:

1. a mounted file `<secrets_dir>/<secret name>/<key>`: the chart mounts every Secret in
   `agent.credentialSecrets` read-only under `/var/run/stoker/secrets/<name>/`, and the
   kubelet refreshes it when the Secret is rotated. No RBAC on Secrets is needed.
2. an environment variable `STOKER_SECRET_<NAME>_<KEY>` (upper case; every character
   outside A-Z and 0-9 becomes `_`), for pods that inject credentials as env.
3. the API server, only for Secrets listed in `api_secrets` (the chart's
   `agent.apiReadableSecrets`, which also grants `get` on exactly those names).

Values never appear in logs, status, events or exception messages; errors name the Secret,
the key and what to do.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, Protocol

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from stoker import kube
from stoker.agent.download import CredentialError, Credentials

__all__ = ["CredentialLookupError", "CredentialResolver", "configure", "default_resolver", "env_variable"]

log = logging.getLogger(__name__)

DEFAULT_SECRETS_DIR = pathlib.Path("/var/run/stoker/secrets")


class SecretRefLike(Protocol):
    name: str
    key: str
    header: str


class SecretReader(Protocol):
    """The part of `stoker.kube.Objects` the API lookup uses."""

    namespace: str
    core: Any


class CredentialLookupError(Exception):
    """The credential named by a ModelCache cannot be found or used; `reason` is machine-readable."""

    def __init__(self, reason: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason, self.message, self.retryable = reason, message, retryable


def env_variable(secret_name: str, key: str) -> str:
    """The environment variable that may carry `key` of Secret `secret_name`."""
    return "STOKER_SECRET_" + re.sub(r"[^A-Z0-9]", "_", f"{secret_name}_{key}".upper())


@dataclasses.dataclass(frozen=True)
class CredentialResolver:
    """Where this agent may find credentials (built from its settings)."""

    secrets_dir: pathlib.Path | None = DEFAULT_SECRETS_DIR
    """Folder of mounted Secrets (`<name>/<key>` files); None to not look there."""
    api_secrets: frozenset[str] = frozenset()
    """Secrets the agent may read through the API server (needs RBAC get on each)."""
    environ: Mapping[str, str] = dataclasses.field(default_factory=lambda: os.environ, repr=False)

    def lookup(self, objects: SecretReader, model: str, ref: SecretRefLike) -> Credentials:
        """The credentials for ModelCache `model`'s secretRef; raises `CredentialLookupError`."""
        where = f"Secret {objects.namespace}/{ref.name} key {ref.key!r} (named by ModelCache {model})"
        value = self._from_file(ref, where)
        if value is None:
            value = self.environ.get(env_variable(ref.name, ref.key)) or None
        if value is None:
            value = self._from_api(objects, ref, where)
        try:
            return Credentials.for_header(ref.header, value)
        except CredentialError as exc:
            raise CredentialLookupError("InvalidCredential", f"{where}: {exc}") from None

    def _from_file(self, ref: SecretRefLike, where: str) -> str | None:
        if self.secrets_dir is None or ref.key in (".", ".."):
            return None
        folder = self.secrets_dir / ref.name
        path = folder / ref.key
        try:
            # a mounted Secret's keys are symlinks into a timestamped folder beside them
            if folder.resolve() not in path.resolve().parents:
                return None
            return path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CredentialLookupError("SecretUnreadable", f"cannot read the mounted {where} ({reason})") from None

    def _from_api(self, objects: SecretReader, ref: SecretRefLike, where: str) -> str:
        mount_hint = (f"mount it: add {ref.name} to the chart's agent.credentialSecrets (the agent reads "
                      f"{(self.secrets_dir or DEFAULT_SECRETS_DIR) / ref.name / ref.key}), or set {env_variable(ref.name, ref.key)}")
        if ref.name not in self.api_secrets:
            raise CredentialLookupError("SecretNotFound", f"{where} is not available to this agent: {mount_hint}")
        try:
            secret = objects.core.read_namespaced_secret(ref.name, objects.namespace,
                                                         _request_timeout=kube.REQUEST_TIMEOUT_S)
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # timed out or the connection dropped
            raise CredentialLookupError("SecretUnreadable", f"cannot read {where}: {type(exc).__name__}",
                                        retryable=True) from None
        except ApiException as exc:
            if exc.status == 404:
                raise CredentialLookupError("SecretNotFound", f"{where} does not exist: create it") from None
            if exc.status == 403:
                raise CredentialLookupError(
                    "SecretForbidden", f"the agent may not read {where}: list it in the chart's "
                    f"agent.apiReadableSecrets, or {mount_hint}") from None
            raise CredentialLookupError("SecretUnreadable", f"cannot read {where}: API server answered {exc.status}",
                                        retryable=True) from None
        raw = (secret.data or {}).get(ref.key)
        if raw is None:
            raise CredentialLookupError("SecretKeyMissing", f"{where}: the Secret has no such key")
        try:
            return base64.b64decode(raw).decode()
        except (ValueError, UnicodeDecodeError):
            raise CredentialLookupError("InvalidCredential", f"{where}: the value is not UTF-8 text") from None


_default = CredentialResolver()


def configure(resolver: CredentialResolver) -> None:
    """Set the resolver this process uses (the agent calls it once at start, from its settings)."""
    global _default
    _default = resolver


def default_resolver() -> CredentialResolver:
    return _default
