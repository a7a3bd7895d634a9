"""Prometheus metrics of the job loop, registered beside the cache metrics (`AgentMetrics.jobs`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class JobMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter("stoker_agent_jobs", "Attempts ended by this agent, by outcome (succeeded, failed, cancelled).", ["outcome"], registry=registry)
        self.queue_wait = Histogram("stoker_agent_job_queue_wait_seconds",
                                    "Creation of the job until it got a generation slot on this agent.",
                                    buckets=SECONDS_BUCKETS, registry=registry)
        self.load_seconds = Histogram("stoker_agent_job_load_seconds", "Loading a job's weights into VRAM (or host memory), staging ahead of the slot included.",
                                      buckets=SECONDS_BUCKETS, registry=registry)
        # Its _sum over time is how busy the GPU (or the inference server's GPU) was generating.
        self.inference_seconds = Histogram("stoker_agent_job_inference_seconds", "Running the diffusion pipeline (or the inference server) for a job.",
                                           buckets=SECONDS_BUCKETS, registry=registry)
        # The tier each job's checkpoint came from is in its status (cacheHit), in the operator's
        # stoker_bindings_total{tier} and in stoker_agent_cache_hits/misses_total{tier}: no fourth count.
