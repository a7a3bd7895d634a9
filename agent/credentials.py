"""Model-source credentials from Secrets, each bound to the hosts it may be sent to (I/O).

A ModelCache's `spec.source.secretRef` names a Secret, a key and an HTTP header. Whoever
writes ModelCaches must not be able to send a Secret's token to a server of their choosing,
so the agent uses only the Secrets its operator declared, each with the hosts it may go to
(`CredentialGrant`, the chart's `agent.credentialSecrets`). Before anything is read or sent:

- a Secret without a grant is refused (`CredentialNotAllowed`);
- a source URL whose host is not among the grant's hosts is refused
  (`CredentialHostNotAllowed`), even when the agent may download from any host.

The value is then looked up, in this order:

1. a mounted file `<secrets_dir>/<secret name>/<key>`: the chart mounts every Secret declared
   with `via: mount` read-only under `/var/run/stoker/secrets/<name>/`, and the kubelet
   refreshes it when the Secret is rotated. No RBAC on Secrets is needed.
2. an environment variable named in the grant (`env: {<key>: <VARIABLE>}`), for pods that
   inject credentials as env. The mapping is explicit: no name is derived from the Secret's
   name, so two Secrets can never meet in one variable.
3. the API server, only for Secrets listed in `api_secrets` (the chart's `via: api`, which
   also grants `get` on exactly those names).

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
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import httpx
import pydantic
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from stoker import kube
from stoker.agent.download import CredentialError, Credentials, ascii_host, host_allowed, redact_url

__all__ = [
    "CredentialGrant", "CredentialLookupError", "CredentialResolver", "configure", "default_resolver",
]

log = logging.getLogger(__name__)

DEFAULT_SECRETS_DIR = pathlib.Path("/var/run/stoker/secrets")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST = re.compile(r"^\.?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?$")


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


class CredentialGrant(pydantic.BaseModel):
    """One Secret the agents may use as a model-source credential, and where it may be sent."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    secret: str = pydantic.Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    """Name of the Secret (in the agent's namespace)."""
    hosts: tuple[str, ...] = pydantic.Field(min_length=1)
    """Hosts the credential may be sent to: exact names, or `.example.com` for a domain and its subdomains."""
    env: dict[str, str] = pydantic.Field(default_factory=dict)
    """Secret key -> name of an environment variable holding that key's value (optional)."""

    @pydantic.field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        for host in hosts:
            if not _HOST.match(host) or host in (".",):
                raise ValueError(f"{host!r} is not a host name (use e.g. models.example.com or .example.com)")
        return tuple(h.lower() for h in hosts)

    @pydantic.field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for key, variable in env.items():
            if not _ENV_NAME.match(variable):
                raise ValueError(f"environment variable {variable!r} (for key {key!r}) is not a valid variable name")
        return env

    def allows(self, host: str) -> bool:
        return host_allowed(host, frozenset(self.hosts))


def check_grants(grants: Iterable[CredentialGrant]) -> dict[str, CredentialGrant]:
    """Grants by Secret name; raises ValueError when a Secret or a variable appears twice. Pure."""
    by_secret: dict[str, CredentialGrant] = {}
    variables: dict[str, str] = {}
    for grant in grants:
        if grant.secret in by_secret:
            raise ValueError(f"Secret {grant.secret} is declared twice; give it one entry with all its hosts")
        by_secret[grant.secret] = grant
        for key, variable in grant.env.items():
            other = variables.setdefault(variable, f"{grant.secret}/{key}")
            if other != f"{grant.secret}/{key}":
                raise ValueError(f"environment variable {variable} is named for both {other} and {grant.secret}/{key}; "
                                 "each variable may carry one Secret key")
    return by_secret


@dataclasses.dataclass(frozen=True)
class CredentialResolver:
    """Which credentials this agent may use, for which hosts, and where to find them (from its settings)."""

    grants: Mapping[str, CredentialGrant] = dataclasses.field(default_factory=dict)
    """Secret name -> its grant. A Secret without one is never used."""
    secrets_dir: pathlib.Path | None = DEFAULT_SECRETS_DIR
    """Folder of mounted Secrets (`<name>/<key>` files); None to not look there."""
    api_secrets: frozenset[str] = frozenset()
    """Secrets the agent may read through the API server (needs RBAC get on each)."""
    environ: Mapping[str, str] = dataclasses.field(default_factory=lambda: os.environ, repr=False)

    @classmethod
    def from_grants(cls, grants: Iterable[CredentialGrant], **kwargs: Any) -> CredentialResolver:
        return cls(grants=check_grants(grants), **kwargs)

    def check(self, namespace: str, model: str, ref: SecretRefLike, url: str) -> CredentialGrant:
        """The grant that lets ModelCache `model` send `ref` to `url`'s host; raises `CredentialLookupError`.
        Pure: nothing is read, so a refusal never touches the credential."""
        where = f"Secret {namespace}/{ref.name} (named by ModelCache {model})"
        grant = self.grants.get(ref.name)
        if grant is None:
            raise CredentialLookupError(
                "CredentialNotAllowed",
                f"{where} is not declared as a model credential, so it is never sent: list it with the hosts it may "
                f"be sent to in the chart's agent.credentialSecrets ({{name: {ref.name}, hosts: [...]}})")
        try:
            host = ascii_host(httpx.URL(url))
        except (httpx.InvalidURL, TypeError, UnicodeError):
            host = ""
        if not host or not grant.allows(host):
            raise CredentialLookupError(
                "CredentialHostNotAllowed",
                f"{where} may be sent only to {', '.join(grant.hosts)}, not to {host or 'the host'} of "
                f"{redact_url(url)}; nothing was sent. Use a URL on one of those hosts, or add the host to the "
                f"Secret's hosts in agent.credentialSecrets")
        return grant

    def lookup(self, objects: SecretReader, model: str, ref: SecretRefLike, url: str) -> Credentials:
        """The credentials for ModelCache `model`'s secretRef, to be sent to `url`; raises `CredentialLookupError`."""
        grant = self.check(objects.namespace, model, ref, url)
        where = f"Secret {objects.namespace}/{ref.name} key {ref.key!r} (named by ModelCache {model})"
        value = self._from_file(ref, where)
        if value is None and ref.key in grant.env:
            value = self.environ.get(grant.env[ref.key]) or None
        if value is None:
            value = self._from_api(objects, ref, where, grant)
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

    def _from_api(self, objects: SecretReader, ref: SecretRefLike, where: str, grant: CredentialGrant) -> str:
        env_hint = f", or set {grant.env[ref.key]}" if ref.key in grant.env else ""
        mount_hint = (f"mount it (via: mount in the chart's agent.credentialSecrets; the agent reads "
                      f"{(self.secrets_dir or DEFAULT_SECRETS_DIR) / ref.name / ref.key}){env_hint}")
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
                    "SecretForbidden", f"the agent may not read {where}: declare it with via: api in the chart's "
                    f"agent.credentialSecrets, or {mount_hint}") from None
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
