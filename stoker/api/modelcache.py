"""ModelCache: one model artifact and how warm to keep it."""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from stoker.api.base import Condition, ObjectName, Resource, StokerModel

# Transition rules (they see oldSelf, so they run on updates only). What the bytes are is fixed
# for a ModelCache's life: a different url or sha256 is a different model. Credentials
# (secretRef) rotate and a sizeBytes hint may be corrected, so those stay mutable.
SOURCE_RULES = (
    {"rule": "self.url == oldSelf.url", "fieldPath": ".url", "reason": "FieldValueForbidden",
     "message": "url is immutable: a different source is a different model; create a new ModelCache"},
    {"rule": "has(self.sha256) == has(oldSelf.sha256) && (!has(self.sha256) || self.sha256 == oldSelf.sha256)",
     "fieldPath": ".sha256", "reason": "FieldValueForbidden",
     "message": "sha256 is immutable: different bytes are a different model; create a new ModelCache"},
)

class ArtifactKind(enum.StrEnum):
    CHECKPOINT = "checkpoint"
    LORA = "lora"
    VAE = "vae"
    UPSCALER = "upscaler"
    CONTROLNET = "controlnet"
    EMBEDDING = "embedding"


class WeightFormat(enum.StrEnum):
    """The formats agents can load. Pickle-based files (ckpt, pt, bin) are not among them: loading
    them runs code from the file, and no loader here reads them, so they are refused at admission."""

    SAFETENSORS = "safetensors"


class SecretRef(StokerModel):
    """A key of a Secret in the ModelCache's namespace holding a credential for the source."""

    name: ObjectName
    """Name of the Secret."""
    key: str = Field(default="token", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key inside the Secret whose value is the credential."""
    header: str = Field(default="Authorization", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9-]+$")
    """HTTP header that carries the credential. For Authorization the value is sent as a bearer token unless it already names a scheme."""


class ModelSource(StokerModel):
    """Where the weights come from."""

    url: str = Field(max_length=2048, pattern=r"^https?://[^\s/$.?#][^\s]*$")
    """HTTP(S) URL of the file. Plain http is refused by agents unless they are configured to allow it."""
    secret_ref: SecretRef | None = None
    """Optional credential for the URL. Never logged or reported."""
    sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$")
    """Expected SHA-256 of the file, lowercase hex. A download that does not match is discarded."""
    size_bytes: int | None = Field(default=None, ge=1, le=2**44)
    """Size of the file in bytes. A hint used for placement before the first download; checked against the download."""


class Autoscale(StokerModel):
    """Add warm copies as demand rises; remove them as it falls."""

    max_replicas: int = Field(ge=1, le=1000)
    """Upper bound on disk copies the autoscaler may ask for."""
    target_jobs_per_minute: float = Field(default=6.0, gt=0, le=10000)
    """Demand one copy should serve, in jobs per minute. Desired copies = ceil(demand / target), between replicas and maxReplicas."""


class ModelCacheSpec(StokerModel):
    """Desired state of a ModelCache."""

    source: ModelSource = Field(json_schema_extra={"x-kubernetes-validations": list(SOURCE_RULES)})
    """Where the weights come from. url and sha256 are immutable; secretRef and sizeBytes may change."""
    kind: ArtifactKind = ArtifactKind.CHECKPOINT
    """What the artifact is: checkpoint, lora, vae, upscaler, controlnet or embedding (immutable)."""
    format: WeightFormat = WeightFormat.SAFETENSORS
    """File format (immutable): safetensors. Pickle-based formats (ckpt, pt, bin) run code when loaded and are not supported: convert them to safetensors first (for example with safetensors.torch.save_file)."""
    allow_pickle: bool = False
    """Has no effect: no pickle-based format is accepted, whatever its value. Kept so that existing manifests still apply (immutable)."""
    replicas: int = Field(default=1, ge=0, le=1000)
    """Keep at least this many copies on agents' disks; those copies are never evicted."""
    hot_replicas: int = Field(default=0, ge=0, le=1000)
    """Keep this many copies loaded in GPU memory (or pinned RAM), ready to run at once."""
    autoscale: Autoscale | None = None
    """Raise the number of copies with demand, up to maxReplicas."""

    @model_validator(mode="after")
    def _check_rules(self) -> ModelCacheSpec:
        # Mirrors the CEL rules in ModelCache.spec_rules, so clients fail early too.
        if self.hot_replicas > self.replicas and self.autoscale is None:
            raise ValueError(ModelCache.spec_rules[0]["message"])
        if self.autoscale is not None and self.autoscale.max_replicas < self.replicas:
            raise ValueError(ModelCache.spec_rules[1]["message"])
        return self


class CopyCounts(StokerModel):
    """Copies of the model per cache tier."""

    disk: int = 0
    """Agents holding the file on disk (including baked-in copies)."""
    ram: int = 0
    """Agents holding it in pinned host memory."""
    vram: int = 0
    """Agents holding it loaded in GPU memory."""


class ModelCopy(StokerModel):
    """One agent holding the model."""

    agent: ObjectName
    """CacheAgent name."""
    tier: Literal["disk", "ram", "vram", "downloading"]
    """Fastest tier the copy is in."""
    held: bool = False
    """Kept there as a replica target (never evicted)."""


class ModelCacheStatus(StokerModel):
    """Observed state of a ModelCache, written by the operator."""

    observed_generation: int | None = None
    """The metadata.generation this status reflects."""
    size_bytes: int | None = None
    """Size of the file, as measured by an agent or given in spec (absent while unknown; see sizeSource)."""
    size: str | None = Field(default=None, max_length=32)
    """sizeBytes for people (2.1 GiB), or unknown until an agent downloads the file and no sizeBytes hint is given."""
    size_source: Literal["Measured", "Spec", "Unknown"] = "Unknown"
    """Where sizeBytes comes from: Measured by an agent, the Spec's sizeBytes hint, or Unknown (placement then assumes a typical size for the kind, never shown as a size)."""
    sha256: str | None = Field(default=None, min_length=64, max_length=64, pattern=r"^[a-f0-9]{64}$")
    """SHA-256 of the model's bytes: spec.source.sha256 when given, else the digest of the first copy an agent downloaded and reported. Agents verify a copy fetched from another agent against it, and fetch only from the source while it is unknown."""
    desired_replicas: int = 0
    """Disk copies the operator is aiming for (replicas, raised by autoscale)."""
    replicas: int = 0
    """Held copies on disk now (the scale subresource's status.replicas: `kubectl scale mc/NAME --replicas=N` and HorizontalPodAutoscalers read it)."""
    selector: str = Field(default="", max_length=320)
    """Label selector of the scale subresource, as HPA requires one: stoker.dev/model=NAME."""
    ready: str = Field(default="", max_length=32)
    """Held disk copies and loaded copies against their targets, for kubectl get: 2/2 (hot 1/1)."""
    desired_hot_replicas: int = 0
    """Loaded copies the operator is aiming for."""
    copies: CopyCounts = Field(default_factory=CopyCounts)
    """Copies per tier."""
    agents: list[ModelCopy] = Field(default_factory=list, max_length=10000)
    """Which agents hold the model, and where."""
    demand_jobs_per_minute: float = 0.0
    """Recent demand, an exponentially weighted rate of jobs per minute."""
    last_used: str | None = None
    """When a job last used the model (RFC 3339)."""
    use_rank: float | None = None
    """How much the model is used across the fleet, as a time in seconds since the Unix epoch: one job ranks at its creation time, n jobs created together about 2h * log2(n) later, and every job's weight halves every 2 hours, so a higher rank means more, and more recent, use. Counted over every GenerationJob that names the model (as checkpoint, LoRA or VAE), and rewritten once it moved by a minute or more. An agent that downloads the model starts its copy's eviction rank from this value, so a model in steady use elsewhere is not evicted as a one-off."""
    use_rank_counted_through: str | None = Field(default=None, max_length=64)
    """Creation time of the newest GenerationJob counted in useRank (RFC 3339). A restarted operator starts from useRank and counts only jobs created after this time, so no job is counted twice."""
    conditions: list[Condition] = Field(default_factory=list, max_length=16)
    """Ready (replica targets met), Available (at least one copy exists), Failed (the source is bad)."""


class ModelCache(Resource):
    """A model artifact (checkpoint, LoRA, VAE, ...) and how many warm copies of it to keep across the fleet."""

    kind_name: ClassVar[str] = "ModelCache"
    plural: ClassVar[str] = "modelcaches"
    short_names: ClassVar[tuple[str, ...]] = ("mc",)
    printer_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Kind", "type": "string", "jsonPath": ".spec.kind"},
        {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
        {"name": "Copies", "type": "string", "jsonPath": ".status.ready",
         "description": "held disk copies and loaded copies against their targets"},
        {"name": "Size", "type": "string", "jsonPath": ".status.size"},
        {"name": "Warm", "type": "integer", "jsonPath": ".status.copies.disk", "description": "agents with it on disk"},
        {"name": "Hot", "type": "integer", "jsonPath": ".status.copies.vram", "description": "agents with it loaded"},
        {"name": "Demand", "type": "number", "jsonPath": ".status.demandJobsPerMinute", "description": "jobs per minute"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas", "priority": 1},
        {"name": "Hot Replicas", "type": "integer", "jsonPath": ".spec.hotReplicas", "priority": 1},
        {"name": "Size Source", "type": "string", "jsonPath": ".status.sizeSource", "priority": 1},
        {"name": "Last Used", "type": "date", "jsonPath": ".status.lastUsed", "priority": 1},
    )
    scale: ClassVar[dict[str, str] | None] = {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}
    spec_rules: ClassVar[tuple[dict[str, str], ...]] = (
        {"rule": "self.hotReplicas <= self.replicas || has(self.autoscale)", "fieldPath": ".hotReplicas",
         "reason": "FieldValueInvalid",
         "message": "hotReplicas must not exceed replicas: every loaded copy is also a disk copy"},
        {"rule": "!has(self.autoscale) || self.autoscale.maxReplicas >= self.replicas",
         "fieldPath": ".autoscale.maxReplicas", "reason": "FieldValueInvalid",
         "message": "autoscale.maxReplicas must be at least replicas"},
        # Transition rules: what the file is and how it may be loaded are fixed, like its source.
        {"rule": "self.kind == oldSelf.kind", "fieldPath": ".kind", "reason": "FieldValueForbidden",
         "message": "kind is immutable: create a new ModelCache for a different artifact"},
        {"rule": "self.format == oldSelf.format", "fieldPath": ".format", "reason": "FieldValueForbidden",
         "message": "format is immutable: create a new ModelCache for a file in another format"},
        {"rule": "self.allowPickle == oldSelf.allowPickle", "fieldPath": ".allowPickle", "reason": "FieldValueForbidden",
         "message": "allowPickle is immutable: create a new ModelCache to change how the file may be loaded"},
    )

    kind: Literal["ModelCache"] = "ModelCache"
    spec: ModelCacheSpec
    """Desired state: where the model comes from and how many copies to keep warm."""
    status: ModelCacheStatus | None = None
    """Observed state, written by the operator."""
