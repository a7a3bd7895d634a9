"""Agent settings from the environment (`STOKER_*`) and command-line flags.

Flags override environment variables, which override defaults. Every field has
a flag named after it (`disk_budget_bytes` -> `--disk-budget-bytes`) and an
environment variable (`STOKER_DISK_BUDGET_BYTES`). Sizes accept units
(`50GiB`, `500M`, `2Ti`), host lists accept commas. Settings are validated at
start and failures name the setting, the bad value and what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any

import pydantic
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from stoker.agent.credentials import CredentialGrant, check_grants
from stoker.agent.download import DownloadPolicy
from stoker.agent.output import OutputPolicy
from stoker.units import parse_bytes

__all__ = ["AgentSettings", "SettingsError", "parse_size_bytes"]

GiB = 2**30


class SettingsError(ValueError):
    """The agent's configuration is invalid; the message lists every problem."""


def parse_size_bytes(value: object) -> int:
    """`50GiB`, `500M`, `1.5Ti` or a plain integer, as bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 50GiB, got a boolean")
    if isinstance(value, int):
        return value
    return parse_bytes(str(value))


def _split_hosts(value: object) -> object:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        return [h.strip() for item in value for h in str(item).split(",") if h.strip()] or None
    return value


SizeBytes = Annotated[int, pydantic.BeforeValidator(parse_size_bytes)]


class AgentSettings(BaseSettings):
    """Configuration of one agent process."""

    model_config = SettingsConfigDict(
        env_prefix="STOKER_", extra="forbid", validate_default=True, use_attribute_docstrings=True
    )

    # ---- disk tier ----
    cache_dir: pathlib.Path = pathlib.Path("/var/cache/stoker")
    """Writable directory for downloaded models (an emptyDir or local volume)."""
    preload_dir: pathlib.Path | None = None
    """Read-only directory of baked-in models with a manifest.json; optional."""
    disk_budget_bytes: SizeBytes = 50 * GiB
    """Bytes of downloaded models the agent may keep (baked-in models do not count)."""
    verify_on_start: bool = False
    """Re-hash every cached file at start (slow for large caches; sizes and safetensors headers are always checked)."""

    # ---- downloads ----
    allow_http: bool = False
    """Allow plain http model URLs (in-cluster mirrors); https only otherwise."""
    allowed_hosts: Annotated[list[str] | None, NoDecode] = None
    """Only download from these hosts (`.example.com` allows a domain); any host if unset."""
    max_downloads: int = Field(default=2, ge=1, le=64)
    """Downloads running at once."""
    max_prefetches: int = Field(default=1, ge=1, le=63)
    """How many of those may be prefetches ordered by the operator; fewer than max_downloads, so a job never waits for a slot behind prefetches."""
    download_connect_timeout_s: float = Field(default=10.0, gt=0)
    download_read_timeout_s: float = Field(default=30.0, gt=0)
    download_max_attempts: int = Field(default=6, ge=1, le=100)
    download_min_bytes_per_s: SizeBytes = 32 * 2**10
    """A download slower than this on average over download_throughput_window_s is cut off (and retried); 0 turns it off."""
    download_throughput_window_s: float = Field(default=60.0, gt=0)
    """The window the minimum download rate is measured over."""
    download_deadline_s: float = Field(default=4 * 3600.0, gt=0)
    """A download not finished this long after it started fails with DeadlineExceeded, retries included."""
    credentials: Annotated[list[CredentialGrant], NoDecode] = Field(default_factory=list)
    """Secrets usable as model-source credentials, each with the hosts it may be sent to, as JSON:
    [{"secret": "hub-token", "hosts": ["models.example.com", ".hub.example"], "env": {"token": "HUB_TOKEN"}}]
    (the chart's agent.credentialSecrets). A Secret not listed is never read or sent."""
    secrets_dir: pathlib.Path | None = pathlib.Path("/var/run/stoker/secrets")
    """Folder of mounted Secrets holding model-source credentials, as `<secret>/<key>` files (the chart's agent.credentialSecrets)."""
    api_secrets: Annotated[list[str] | None, NoDecode] = None
    """Secrets in `credentials` the agent may also read through the API server when they are not mounted (via: api in the chart)."""

    # ---- outputs ----
    output_allow_http: bool = False
    """Allow plain http output URLs; https only otherwise."""
    output_allowed_hosts: Annotated[list[str] | None, NoDecode] = None
    """Only deliver images to these hosts (`.example.com` allows a domain); any host if unset."""
    output_timeout_s: float = Field(default=120.0, gt=0)
    """A delivery (every try of the PUT together) not finished this long after it started fails."""

    # ---- peers: the agents of a fleet fetch models from each other ----
    peer_token_file: pathlib.Path | None = pathlib.Path("/var/run/stoker/peer/token")
    """File holding the fleet's peer credential (the chart generates it as a Secret mounted into agents only). Without it the agent neither serves other agents nor fetches from them."""
    peer_port: int = Field(default=8471, ge=0, le=65535)
    """Port of the peer endpoint; 0 picks a free one."""
    peer_addr: str = "0.0.0.0"
    """Address the peer endpoint listens on."""
    peer_advertise_host: str | None = None
    """IP address other agents reach this one at (the pod IP, from the downward API); default: peer_addr when it is an address, else this host's."""
    peer_max_uploads: int = Field(default=2, ge=1, le=64)
    """Transfers served to other agents at once; more are turned away to another holder."""
    peer_upload_bytes_per_s: SizeBytes = 400 * 2**20
    """Cap on the bytes per second served to other agents, all transfers together (0: no cap), so serving never slows the agent's own loads."""
    peer_fetch: bool = True
    """Fetch a model from another agent that holds a verified copy before going to its source."""
    peer_duplicate_discount_s: float = Field(default=8 * 3600.0, ge=0)
    """Copies the operator says other agents also hold (CacheAgent spec.duplicates) are evicted as if last used this much earlier: a peer can give them back, the fleet's last copy only the source can."""

    # ---- jobs and identity ----
    job_slots: int = Field(default=1, ge=1, le=64)
    """Generations this agent runs at once."""
    queue_slots: int = Field(default=1, ge=0, le=64)
    """Jobs accepted beyond job_slots: their models download and load while the running generations finish."""
    namespace: str = "default"
    """Namespace of the agent's pod and CacheAgent (set from the downward API)."""
    pod_name: str | None = None
    """Name of the agent's pod (downward API): its CacheAgent and Lease have this name, which the
    chart's admission policy checks against the pod its service-account token is bound to."""
    node_name: str | None = None
    zone: str | None = None
    fleet: str | None = Field(default=None, max_length=63, pattern=r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
    """Label the CacheAgent stoker.dev/fleet=<fleet>: the operator started with the same --fleet manages it (chart value `fleet`)."""

    # ---- API server and reporting (the reporter extends these) ----
    lease_duration_s: float = Field(default=15.0, gt=0)
    """How long the agent's Lease stays valid without renewal."""
    lease_renew_interval_s: float = Field(default=5.0, gt=0)
    status_min_interval_s: float = Field(default=1.0, ge=0)
    """Minimum time between CacheAgent status writes (significant changes excepted)."""

    # ---- observability ----
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Port of the /metrics endpoint; 0 picks a free port (logged). --no-metrics-enabled turns the endpoint off."""
    metrics_addr: str = "127.0.0.1"
    """Address the /metrics endpoint listens on; 0.0.0.0 (or ::) where Prometheus scrapes the pod, as the chart sets it."""
    metrics_enabled: bool = True
    health_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of /healthz (liveness) and /readyz (readiness); unset: no health endpoint; 0 picks a free port."""
    health_addr: str = "127.0.0.1"
    """Address the health endpoint listens on; 0.0.0.0 in a pod, so the kubelet reaches it."""
    liveness_failing_renewals_s: float = Field(default=300.0, gt=0)
    """/healthz fails once every Lease renewal has failed for this long (a stuck renewal loop fails it after lease_duration_s)."""
    log_level: str = "INFO"

    @field_validator("allowed_hosts", "api_secrets", "output_allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: object) -> object:
        return _split_hosts(value)

    @field_validator("credentials", mode="before")
    @classmethod
    def _grants(cls, value: object) -> object:
        # JSON from the environment or a flag (a repeated flag gives a list of JSON texts)
        texts = [value] if isinstance(value, str) else value
        if isinstance(texts, list) and all(isinstance(t, str) for t in texts):
            grants: list[object] = []
            for text in texts:
                try:
                    parsed = json.loads(text) if text.strip() else []
                except ValueError as exc:
                    raise ValueError(f"not JSON ({exc.msg} at character {exc.pos}); expected a list such as "
                                     '[{"secret": "hub-token", "hosts": ["models.example.com"]}]') from None
                grants.extend(parsed if isinstance(parsed, list) else [parsed])
            return grants
        return value

    @field_validator("peer_token_file", mode="before")
    @classmethod
    def _no_peer_file(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("disk_budget_bytes")
    @classmethod
    def _positive_budget(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("the disk budget must be more than 0 bytes (for example 50GiB)")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("use one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @model_validator(mode="after")
    def _check(self) -> AgentSettings:
        self._check_cache_dir()
        if self.preload_dir is not None and not self.preload_dir.is_dir():
            raise ValueError(
                f"preload_dir {self.preload_dir} is not a directory; mount the baked-in models there or unset it"
            )
        if self.lease_renew_interval_s >= self.lease_duration_s:
            raise ValueError(
                f"lease_renew_interval_s ({self.lease_renew_interval_s}) must be shorter than "
                f"lease_duration_s ({self.lease_duration_s}), or the Lease expires between renewals"
            )
        grants = check_grants(self.credentials)
        missing = sorted(set(self.api_secrets or ()) - set(grants))
        if missing:
            raise ValueError(
                f"api_secrets names {', '.join(missing)}, which credentials does not declare; declare each Secret "
                f"with the hosts it may be sent to")
        if self.max_prefetches >= self.max_downloads:
            raise ValueError(
                f"max_prefetches ({self.max_prefetches}) must be less than max_downloads ({self.max_downloads}), "
                f"so a job's download never waits behind prefetches; raise max_downloads"
            )
        return self

    def _check_cache_dir(self) -> None:
        path = self.cache_dir
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cache_dir {path} cannot be created ({exc.strerror}); mount a writable volume there") from None
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"cache_dir {path} is not a writable directory; mount a writable volume there")

    # ---- construction ------------------------------------------------------

    @classmethod
    def load(cls, **overrides: Any) -> AgentSettings:
        """Settings from the environment plus `overrides`; raises `SettingsError` with readable messages."""
        try:
            return cls(**overrides)
        except pydantic.ValidationError as exc:
            raise SettingsError(_explain(exc)) from None

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> AgentSettings:
        """Settings from flags, then `STOKER_*` variables, then defaults."""
        parser = cls.argument_parser()
        namespace = parser.parse_args(argv)
        overrides = {k: v for k, v in vars(namespace).items() if v is not None}
        return cls.load(**overrides)

    @classmethod
    def argument_parser(cls) -> argparse.ArgumentParser:
        """One flag per field; the lead's CLI can add its own flags to it."""
        parser = argparse.ArgumentParser(prog="stoker-agent", description="Stoker agent: one per GPU pod.")
        for name, info in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            env = f"STOKER_{name.upper()}"
            doc = (info.description or "").strip()
            help_text = f"{doc} (env {env}; default {info.default!r})"
            kind = _base_type(info.annotation)
            if kind is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif kind is list:
                metavar = "HOST" if "host" in name else ("JSON" if name == "credentials" else "NAME")
                parser.add_argument(flag, action="append", default=None, metavar=metavar, help=help_text + "; repeat or use commas")
            else:
                parser.add_argument(flag, default=None, help=help_text)
        return parser

    # ---- views for the components -----------------------------------------

    def download_policy(self) -> DownloadPolicy:
        return DownloadPolicy(
            allow_http=self.allow_http,
            allowed_hosts=frozenset(self.allowed_hosts) if self.allowed_hosts else None,
            connect_timeout_s=self.download_connect_timeout_s,
            read_timeout_s=self.download_read_timeout_s,
            max_attempts=self.download_max_attempts,
            min_bytes_per_s=self.download_min_bytes_per_s,
            throughput_window_s=self.download_throughput_window_s,
            deadline_s=self.download_deadline_s,
        )

    def output_policy(self) -> OutputPolicy:
        return OutputPolicy(
            allow_http=self.output_allow_http,
            allowed_hosts=frozenset(self.output_allowed_hosts) if self.output_allowed_hosts else None,
            deadline_s=self.output_timeout_s,
        )


def _base_type(annotation: object) -> object:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _base_type(args[0])
    if origin in (typing.Union, types.UnionType) and args:
        return _base_type(args[0])
    return origin or annotation


def _explain(exc: pydantic.ValidationError) -> str:
    lines = ["invalid agent settings:"]
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        field = str(err["loc"][0]) if err["loc"] else ""
        where = f"{name} (flag --{field.replace('_', '-')}, env STOKER_{field.upper()})" if field else "settings"
        message = err["msg"].removeprefix("Value error, ")
        shown = err.get("input")
        value = f" [got {shown!r}]" if err["loc"] and shown is not None and not isinstance(shown, dict) else ""
        lines.append(f"  {where}: {message}{value}")
    return "\n".join(lines)
