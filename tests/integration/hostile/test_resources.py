"""Hostile resources: the API server refuses them through the CRD schema with a message naming the
field, nothing is stored, and the agent (its Lease) never notices. Reports written into status are
bounded too: no writer can grow an object, or a metric, without limit."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

API = "stoker.dev/v1alpha1"
URL = "https://models.example.com/sd.safetensors"


def source(**changes: Any) -> dict[str, Any]:
    return {"url": URL, **changes}


MODEL_CACHES = [
    ("ftp-url", {"source": source(url="ftp://models.example.com/sd.safetensors")}, "spec.source.url"),
    ("url-with-a-space", {"source": source(url="https://models.example.com/s d.safetensors")}, "spec.source.url"),
    ("url-too-long", {"source": source(url="https://models.example.com/" + "a" * 2100)}, "spec.source.url"),
    ("uppercase-digest", {"source": source(sha256="A" * 64)}, "spec.source.sha256"),
    ("short-digest", {"source": source(sha256="ab" * 10)}, "spec.source.sha256"),
    ("size-zero", {"source": source(sizeBytes=0)}, "spec.source.sizeBytes"),
    ("size-beyond-16-tib", {"source": source(sizeBytes=2**45)}, "spec.source.sizeBytes"),
    ("secret-name-traversal", {"source": source(secretRef={"name": "../kube-system/token"})}, "spec.source.secretRef.name"),
    ("secret-key-traversal", {"source": source(secretRef={"name": "hub", "key": "a/../../b"})}, "spec.source.secretRef.key"),
    ("header-injection", {"source": source(secretRef={"name": "hub", "header": "X-A\r\nHost: evil"})},
     "spec.source.secretRef.header"),
    ("negative-replicas", {"source": source(), "replicas": -1}, "spec.replicas"),
    ("too-many-replicas", {"source": source(), "replicas": 100000}, "spec.replicas"),
    ("more-hot-than-warm", {"source": source(), "replicas": 1, "hotReplicas": 3}, "hotReplicas must not exceed replicas"),
    ("pickle-without-consent", {"source": source(), "format": "ckpt"}, "pickle-based"),
    ("unknown-kind", {"source": source(), "kind": "shellscript"}, "spec.kind"),
]


def params(**changes: Any) -> dict[str, Any]:
    return {"prompt": "a fox", **changes}


GENERATION_JOBS = [
    ("no-steps", {"model": "sd", "params": params(steps=0)}, "spec.params.steps"),
    ("too-many-steps", {"model": "sd", "params": params(steps=100000)}, "spec.params.steps"),
    ("huge-image", {"model": "sd", "params": params(width=65536)}, "spec.params.width"),
    ("odd-width", {"model": "sd", "params": params(width=513)}, "spec.params.width"),
    ("prompt-too-long", {"model": "sd", "params": params(prompt="x" * 5000)}, "spec.params.prompt"),
    ("huge-batch", {"model": "sd", "params": params(batchSize=1000)}, "spec.params.batchSize"),
    ("too-many-loras", {"model": "sd", "params": params(), "loras": [{"name": f"l{i}"} for i in range(17)]},
     "spec.loras"),
    ("model-name-traversal", {"model": "../../etc/passwd", "params": params()}, "spec.model"),
    ("output-file-url", {"model": "sd", "params": params(), "output": {"url": "file:///etc/passwd"}}, "spec.output.url"),
    ("zero-attempts", {"model": "sd", "params": params(), "maxAttempts": 0}, "spec.maxAttempts"),
    ("priority-overflow", {"model": "sd", "params": params(), "priority": 10**9}, "spec.priority"),
    ("unknown-sampler", {"model": "sd", "params": params(sampler="rm -rf")}, "spec.params.sampler"),
]


def refused(attempt: Any, field: str) -> str:
    with pytest.raises(ApiException) as info:
        attempt()
    assert info.value.status == 422, info.value.body
    message = json.loads(info.value.body)["message"]
    assert field in message, message
    return str(message)


@pytest.mark.parametrize(("spec", "field"), [c[1:] for c in MODEL_CACHES], ids=[c[0] for c in MODEL_CACHES])
def test_a_hostile_model_cache_is_refused_by_the_schema_and_not_stored(suite, spec, field) -> None:  # type: ignore[no-untyped-def]
    name = suite.name("mc")
    refused(lambda: suite.admin.create("ModelCache", {"apiVersion": API, "kind": "ModelCache",
                                                      "metadata": {"name": name}, "spec": spec}), field)
    assert name not in {m["metadata"]["name"] for m in suite.admin.list("ModelCache")["items"]}
    suite.lease_renewed()


@pytest.mark.parametrize(("spec", "field"), [c[1:] for c in GENERATION_JOBS], ids=[c[0] for c in GENERATION_JOBS])
def test_a_hostile_generation_job_is_refused_by_the_schema_and_not_stored(suite, spec, field) -> None:  # type: ignore[no-untyped-def]
    name = suite.name("job")
    refused(lambda: suite.admin.create("GenerationJob", {"apiVersion": API, "kind": "GenerationJob",
                                                         "metadata": {"name": name}, "spec": spec}), field)
    assert name not in {j["metadata"]["name"] for j in suite.admin.list("GenerationJob")["items"]}
    suite.lease_renewed()


@pytest.mark.parametrize(("patch", "field"), [
    ({"attemptFailure": {"attempt": 1, "agent": "agent-0", "reason": "R" * 200}}, "status.attemptFailure.reason"),
    ({"attemptFailure": {"attempt": 1, "agent": "agent-0", "reason": "Boom", "message": "m" * 100_000}},
     "status.attemptFailure.message"),
    ({"reason": "X" * 1000}, "status.reason"),
    ({"message": "m" * 100_000}, "status.message"),
    ({"history": [{"attempt": 1, "outcome": "Failed", "reason": "Boom", "message": "m" * 5000}]}, "status.history[0].message"),
], ids=["attempt-reason", "attempt-message", "reason", "message", "history-message"])
def test_a_job_status_report_beyond_its_bounds_is_refused(suite, patch, field) -> None:  # type: ignore[no-untyped-def]
    name = suite.name("bounds")
    suite.admin.create("GenerationJob", {"apiVersion": API, "kind": "GenerationJob", "metadata": {"name": name},
                                         "spec": {"model": "not-there", "params": params()}})
    refused(lambda: suite.admin.patch_status("GenerationJob", name, patch), field)
    suite.admin.delete("GenerationJob", name)
    suite.lease_renewed()


def test_an_agent_failure_report_beyond_its_bounds_is_refused(suite) -> None:  # type: ignore[no-untyped-def]
    failure = {"name": "sd", "reason": "R" * 500, "message": "m" * 100_000}
    refused(lambda: suite.admin.patch_status("CacheAgent", "agent-0", {"modelFailures": [failure]}),
            "status.modelFailures[0]")
    suite.lease_renewed()
    suite.cache_intact()
