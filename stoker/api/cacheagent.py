"""CacheAgent: one per agent pod; the operator's orders in spec, the agent's report in status."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from stoker.api.base import Condition, ObjectName, Resource, StokerModel, truncated_text

# Names in the report are ModelCache and GenerationJob names, or the names of baked-in files.
ReportedName = Annotated[str, Field(min_length=1, max_length=253)]
ShortText = truncated_text(128)
LongText = truncated_text(1024)


class HoldOrder(StokerModel):
    """Keep a model on this agent as a replica target."""

    model: ObjectName
    """ModelCache name in the agent's namespace."""
    tier: Literal["disk", "ram", "vram"] = "disk"
    """disk: download and never evict from disk; vram: also keep it loaded in GPU memory (a hot replica); ram: also keep a pinned host copy (on an agent without a RAM tier: loaded, as for vram)."""


class CacheAgentSpec(StokerModel):
    """Orders from the operator. Models not listed in holds are released: the agent may evict them."""

    holds: list[HoldOrder] = Field(default_factory=list, max_length=10000)
    """Models to prefetch and hold. The agent downloads missing ones in the background, behind job downloads."""
    cordon: bool = False
    """Take no new jobs; running jobs finish."""
    duplicates: list[ObjectName] = Field(default_factory=list, max_length=10000)
    """Models on this agent's disk that another Ready agent of the peer tier also holds, so that a peer can give them back: the agent evicts them before copies that are the fleet's last. Written by the operator."""


class GpuInfo(StokerModel):
    """The agent's accelerator."""

    model: ShortText = ""
    """GPU product name, or cpu."""
    vram_bytes: int = 0
    """Total device memory."""


class TierUsage(StokerModel):
    """Capacity and use of one cache tier."""

    budget_bytes: int = 0
    """Byte budget of the tier."""
    used_bytes: int = 0
    """Bytes held."""
    reserved_bytes: int = 0
    """Bytes reserved for downloads or loads in progress."""


class CachedModel(StokerModel):
    """A model the agent holds."""

    name: ReportedName
    """ModelCache name."""
    tier: Literal["disk", "ram", "vram"]
    """Fastest tier the model is in."""
    size_bytes: int
    """Size of the file."""
    last_used: str | None = Field(default=None, max_length=64)
    """When a job last used it (RFC 3339)."""
    rank: float | None = None
    """Where the agent's disk eviction puts the model, as a time in seconds since the Unix epoch; the lowest rank is evicted first. One use ranks at its time, every further use moves the rank later (2 hours for a second use at the same time, less for older ones), and a download starts from the model's useRank in its ModelCache status. Absent for preloaded models, which are never evicted."""
    preloaded: bool = False
    """Baked into the container image: free, never evicted."""
    held: bool = False
    """Held as a replica target."""
    uid: str | None = Field(default=None, max_length=128)
    """metadata.uid of the ModelCache the copy was fetched for. The operator counts a copy only for that ModelCache: one deleted and created again under the same name starts with no copies. Absent for baked-in models."""
    sha256: str | None = Field(default=None, min_length=64, max_length=64, pattern=r"^[a-f0-9]{64}$")
    """SHA-256 of the agent's copy, computed as it was downloaded (absent for baked-in files). Other agents fetch it from this agent's peer endpoint under this digest."""
    hot: Literal["vram", "ram"] | None = None
    """Kept loaded in this tier as a hot replica (a hold order with that tier): never evicted while the order stands."""


class DownloadProgress(StokerModel):
    """A download in progress."""

    name: ReportedName
    """ModelCache name."""
    bytes_done: int = 0
    """Bytes received so far."""
    bytes_total: int | None = None
    """Expected size, when known."""


class Bandwidths(StokerModel):
    """Measured transfer rates in bytes per second (0 when not yet measured)."""

    download_bps: float = 0
    """Network download."""
    disk_to_gpu_bps: float = 0
    """Disk to GPU (or to host memory on a CPU-only agent)."""
    ram_to_gpu_bps: float = 0
    """Pinned host memory to GPU."""
    peer_bps: float = 0
    """Fetches from other agents (the peer tier)."""


class PeerEndpoint(StokerModel):
    """Where other agents of the fleet fetch this agent's verified model files."""

    url: str = Field(max_length=256, pattern=r"^http://(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]{1,5}$")
    """Base URL on the pod network, http://<pod IP>:<port>. A file is at /v1/blobs/sha256/<digest>, for agents that send the fleet's peer credential; nothing else is served."""
    max_uploads: int = Field(default=2, ge=1, le=64)
    """Transfers the agent serves at once; more are refused with 503 (try another holder)."""


class RunningJob(StokerModel):
    """A job the agent is working on."""

    name: ReportedName
    """GenerationJob name."""
    attempt: int
    """Attempt number."""
    expected_remaining_seconds: float = 0
    """Estimate used for queue-wait in placement."""


class ModelFailure(StokerModel):
    """A model the agent could not fetch or verify."""

    name: ReportedName
    """ModelCache name."""
    reason: ShortText
    """One CamelCase word, for example ChecksumMismatch, HTTPNotFound, InvalidHeader."""
    message: LongText = ""
    """Detail (never contains credentials)."""
    retryable: bool = False
    """Whether trying again later may succeed."""
    at: str | None = Field(default=None, max_length=64)
    """When it failed (RFC 3339)."""
    uid: str | None = Field(default=None, max_length=128)
    """metadata.uid of the ModelCache whose source failed (the operator ignores failures of an earlier one)."""
    generation: int | None = Field(default=None, ge=0)
    """metadata.generation of that ModelCache (the operator ignores failures of an earlier spec)."""
    size_bytes: int | None = Field(default=None, ge=0)
    """The model's size as its source announced it, when the failure is about size (ExceedsDiskBudget): a model larger than every agent's disk budget is marked Failed at once."""


class LocalFault(StokerModel):
    """A fault of the agent itself (its disk, its memory), never of a model's source."""

    reason: ShortText
    """DiskFull (no space left on the cache volume), DiskError (the volume failed a read or write) or OutOfMemory."""
    message: LongText = ""
    """What failed, for people."""
    since: str | None = Field(default=None, max_length=64)
    """When the fault was first seen (RFC 3339)."""
    last_seen: str | None = Field(default=None, max_length=64)
    """When it was last seen (RFC 3339); the fault clears when the agent sees the resource work again."""


class CacheAgentStatus(StokerModel):
    """Report written by the agent, except conditions, which the operator writes from the agent's Lease."""

    pod: str = Field(default="", max_length=253)
    """Pod the agent runs in."""
    node: str = Field(default="", max_length=253)
    """Node of the pod."""
    zone: str = Field(default="", max_length=63)
    """Topology zone of the node."""
    gpu: GpuInfo = Field(default_factory=GpuInfo)
    """The accelerator."""
    disk: TierUsage = Field(default_factory=TierUsage)
    """Disk tier."""
    ram: TierUsage = Field(default_factory=TierUsage)
    """Pinned host memory tier."""
    vram: TierUsage = Field(default_factory=TierUsage)
    """GPU memory tier."""
    models: list[CachedModel] = Field(default_factory=list, max_length=10000)
    """Models held, with their fastest tier."""
    disk_usage: str = Field(default="", max_length=48)
    """Disk used/budget for people, for kubectl get: 12.3 GiB/45.0 GiB."""
    vram_usage: str = Field(default="", max_length=48)
    """Loaded models' memory used/budget for people, for kubectl get."""
    models_on_disk: int = 0
    """Count of models on disk (for kubectl get)."""
    hot_models: int = 0
    """Count of models loaded in GPU memory (for kubectl get)."""
    downloads: list[DownloadProgress] = Field(default_factory=list, max_length=1000)
    """Downloads in progress."""
    slots: int = Field(default=1, ge=0, le=1024)
    """Generations the agent runs at once."""
    queue_slots: int = Field(default=0, ge=0, le=1024)
    """Jobs the agent accepts beyond `slots`: it downloads and loads their models while the running generations finish, so a model swap overlaps the previous job."""
    free_slots: int = 0
    """Jobs the operator may still bind: slots + queueSlots minus the jobs bound and not finished."""
    running: list[RunningJob] = Field(default_factory=list, max_length=1000)
    """Jobs bound to the agent and not finished."""
    model_failures: list[ModelFailure] = Field(default_factory=list, max_length=1000)
    """Recent failures to fetch or verify a model that the source answered for; the operator marks those ModelCaches Failed. Local faults are never listed here, nor failures of a fetch from another agent (the agent goes to another holder or the source)."""
    degraded: bool = False
    """The agent has a local fault (see localFaults): it takes no jobs that need a download, and its failures do not count against any model."""
    local_faults: list[LocalFault] = Field(default_factory=list, max_length=16)
    """Faults of the agent itself: a full or failing cache volume, memory exhausted."""
    accepting: bool = True
    """False once the agent is shutting down (SIGTERM): it finishes what runs and takes nothing new."""
    peer: PeerEndpoint | None = None
    """The agent's peer endpoint; absent when it does not serve other agents (no peer credential)."""
    bandwidth: Bandwidths = Field(default_factory=Bandwidths)
    """Measured transfer rates."""
    observed_generation: int | None = None
    """The spec generation whose orders the agent has taken in."""
    results_port: int | None = Field(default=None, ge=1, le=65535)
    """Port of the agent's read-only results endpoint (GET /results/<file>), reached through the API server's pod proxy by `stoker get image`; absent when it is off."""
    conditions: list[Condition] = Field(default_factory=list, max_length=16)
    """Ready (the agent's Lease is being renewed). Written by the operator."""


class CacheAgent(Resource):
    """One agent pod: the operator's orders in spec, the agent's cache report in status."""

    kind_name: ClassVar[str] = "CacheAgent"
    plural: ClassVar[str] = "cacheagents"
    short_names: ClassVar[tuple[str, ...]] = ("ca",)
    printer_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
        {"name": "Cordoned", "type": "boolean", "jsonPath": ".spec.cordon"},
        {"name": "Node", "type": "string", "jsonPath": ".status.node"},
        {"name": "GPU", "type": "string", "jsonPath": ".status.gpu.model"},
        {"name": "Disk", "type": "string", "jsonPath": ".status.diskUsage", "description": "used/budget"},
        {"name": "VRAM", "type": "string", "jsonPath": ".status.vramUsage", "description": "used/budget"},
        {"name": "Models", "type": "integer", "jsonPath": ".status.modelsOnDisk"},
        {"name": "Hot", "type": "integer", "jsonPath": ".status.hotModels"},
        {"name": "Free Slots", "type": "integer", "jsonPath": ".status.freeSlots"},
        {"name": "Degraded", "type": "boolean", "jsonPath": ".status.degraded", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Zone", "type": "string", "jsonPath": ".status.zone", "priority": 1},
        {"name": "Slots", "type": "integer", "jsonPath": ".status.slots", "priority": 1},
        {"name": "Queue Slots", "type": "integer", "jsonPath": ".status.queueSlots", "priority": 1},
        {"name": "Pod", "type": "string", "jsonPath": ".status.pod", "priority": 1},
    )

    kind: Literal["CacheAgent"] = "CacheAgent"
    spec: CacheAgentSpec = Field(default_factory=CacheAgentSpec)
    """Orders from the operator."""
    status: CacheAgentStatus | None = None
    """Report from the agent."""
