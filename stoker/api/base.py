"""Shared building blocks of the Stoker resources."""

from __future__ import annotations

import enum
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "stoker.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Label on a GenerationJob naming the CacheAgent it is bound to; agents watch their
# own jobs through a server-side label selector on it.
AGENT_LABEL = f"{GROUP}/agent"

# A Kubernetes object name (DNS-1123 subdomain).
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]


def truncated_text(max_length: int) -> Any:
    """A string bounded by `max_length` in the schema, cut to fit (with "...") when a writer
    sends more: reports such as error messages should shrink, not fail validation."""

    def cut(value: object) -> object:
        if isinstance(value, str) and len(value) > max_length:
            return value[: max_length - 3] + "..."
        return value

    return Annotated[str, BeforeValidator(cut), Field(max_length=max_length)]


class StokerModel(BaseModel):
    """Base of every API type: camelCase on the wire, field docstrings as descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="forbid",
        validate_assignment=True,
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready form sent to the API server (aliases, no unset optionals)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(StokerModel):
    """A standard Kubernetes condition."""

    type: str = Field(max_length=64)
    """Condition type, for example Ready, Available or Failed."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(default="", max_length=128)
    """One CamelCase word saying why the condition is in this status."""
    message: str = Field(default="", max_length=2048)
    """Human-readable detail: what happened and what to do."""
    last_transition_time: str | None = Field(default=None, max_length=64)
    """When the status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """The metadata.generation this condition was computed from."""


class Resource(StokerModel):
    """A namespaced Stoker custom resource: apiVersion, kind, metadata, spec, status."""

    model_config = ConfigDict(extra="ignore")

    # Set by each resource class; read by the CRD generator.
    kind_name: ClassVar[str]
    plural: ClassVar[str]
    short_names: ClassVar[tuple[str, ...]]
    printer_columns: ClassVar[tuple[dict[str, Any], ...]]
    spec_rules: ClassVar[tuple[dict[str, str], ...]] = ()
    scale: ClassVar[dict[str, str] | None] = None
    """The scale subresource (specReplicasPath, statusReplicasPath, labelSelectorPath), if any."""
    status_default: ClassVar[dict[str, Any] | None] = None
    """A default for the whole status, so the API server fills in the status fields' own
    defaults (GenerationJob: phase Pending) on every object, from its creation on."""

    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", ""))
