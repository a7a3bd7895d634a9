"""The Stoker API: custom resources as pydantic models.

These types are the single source of truth: the CRD YAML in crds/ and
charts/stoker/crds/ is generated from them (`stoker crds`), field docstrings become
the descriptions `kubectl explain` shows, and validation lives next to each field.
Purely declarative: no I/O.
"""

from stoker.api.base import GROUP, VERSION, API_VERSION, Condition, ConditionStatus
from stoker.api.modelcache import ModelCache, ModelCacheSpec, ModelCacheStatus
from stoker.api.generationjob import GenerationJob, GenerationJobSpec, GenerationJobStatus, JobPhase
from stoker.api.cacheagent import CacheAgent, CacheAgentSpec, CacheAgentStatus

RESOURCES = (ModelCache, GenerationJob, CacheAgent)

__all__ = [
    "GROUP", "VERSION", "API_VERSION", "Condition", "ConditionStatus",
    "ModelCache", "ModelCacheSpec", "ModelCacheStatus",
    "GenerationJob", "GenerationJobSpec", "GenerationJobStatus", "JobPhase",
    "CacheAgent", "CacheAgentSpec", "CacheAgentStatus",
    "RESOURCES",
]
