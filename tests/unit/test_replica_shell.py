"""ModelCache status writes of the replica shell: the fleet use rank is published, busy models
are not rewritten per job."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from stoker import userank
from stoker.operator.replica_shell import Copies, ReplicaShell, is_status_write_due
from stoker.operator.state import State, format_time, parse_time

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class FakeObjects:
    def __init__(self, store: dict[str, dict[str, Any]]) -> None:
        self.store = store

    def patch_status(self, kind: str, name: str, patch: dict[str, Any], *, resource_version: str) -> dict[str, Any]:
        body = self.store[name]
        assert body["metadata"]["resourceVersion"] == resource_version
        body["status"] = {**body.get("status", {}), **copy.deepcopy(patch)}
        body["metadata"]["resourceVersion"] = str(int(resource_version) + 1)
        return copy.deepcopy(body)


class SyncWriter:
    """Runs each write at once and counts the status writes."""

    def __init__(self, store: dict[str, dict[str, Any]]) -> None:
        self.fake = FakeObjects(store)
        self.writes: list[dict[str, Any]] = []

    def objects(self, namespace: str) -> FakeObjects:
        return self.fake

    def may_act(self, key: str, resource_version: str) -> bool:
        return True

    def submit(self, key: str, resource_version: str, fn: Callable[[], None], **_: Any) -> bool:
        before = {n: copy.deepcopy(b.get("status")) for n, b in self.fake.store.items()}
        fn()
        self.writes.extend(b["status"] for n, b in self.fake.store.items() if b.get("status") != before[n])
        return True

    def event(self, obj: dict[str, Any], *, reason: str, message: str, warning: bool = False) -> None:
        pass


def model(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "ModelCache",
            "metadata": {"name": "sd", "namespace": "ns", "uid": "mc-sd", "resourceVersion": "1", "generation": 1},
            "spec": {"replicas": 0, "source": {"url": "https://models.test/sd.safetensors"}}, "status": status or {}}


def job(i: int, created_s: float) -> dict[str, Any]:
    return {"apiVersion": "stoker.dev/v1alpha1", "kind": "GenerationJob",
            "metadata": {"name": f"j{i}", "namespace": "ns", "uid": f"u{i}", "resourceVersion": "1",
                         "creationTimestamp": format_time(created_s).replace(".000000", "")},
            "spec": {"model": "sd", "params": {"prompt": "x"}}}


def shell_with(status: dict[str, Any] | None = None) -> tuple[State, ReplicaShell, SyncWriter]:
    body = model(status)
    store = {"sd": body}
    state = State()
    state.upsert_model(copy.deepcopy(body))
    writer = SyncWriter(store)
    return state, ReplicaShell(state, writer, lease_grace_s=None), writer  # type: ignore[arg-type]


def test_a_models_first_jobs_publish_its_fleet_rank_with_the_newest_creation_it_counts() -> None:
    state, shell, writer = shell_with()
    for i in range(3):
        state.upsert_job(job(i, T0 + i))
    shell.apply_once(now=T0 + 5, now_mono=0.0)
    published = writer.writes[-1]
    expected = userank.FleetRank().count_all([T0, T0 + 1, T0 + 2])
    assert published["useRank"] == pytest.approx(expected.rank_s, abs=1e-3)
    assert parse_time(published["useRankCountedThrough"]) == T0 + 2


def test_a_busy_models_status_is_rewritten_every_half_minute_not_per_job() -> None:
    # A model already in heavy use (about a million recent jobs): one more job a second moves its
    # rank by far less than PUBLISH_MIN_CHANGE_S, and lastUsed alone waits for the refresh.
    heavy = {"useRank": T0 + 20 * userank.DEFAULT_HALF_LIFE_S, "useRankCountedThrough": format_time(T0 - 1)}
    state, shell, writer = shell_with(heavy)
    for second in range(90):
        state.upsert_job(job(second, T0 + second))
        shell.apply_once(now=T0 + second + 0.5, now_mono=float(second))
    assert 2 <= len(writer.writes) <= 4, [w.get("lastUsed") for w in writer.writes]
    assert writer.writes[-1]["useRank"] > heavy["useRank"]


class TestWriteDue:
    base = {"observedGeneration": 1, "sizeBytes": 10, "desiredReplicas": 1, "demandJobsPerMinute": 2.0,
            "lastUsed": "2026-01-01T00:00:00Z", "useRank": 1000.0, "useRankCountedThrough": "2026-01-01T00:00:00Z",
            "conditions": []}

    def test_a_changed_copy_count_is_written_at_once(self) -> None:
        assert is_status_write_due(self.base, {**self.base, "sizeBytes": 11}, since_write_s=0.0, refresh_s=30.0)

    def test_fields_that_move_with_every_job_wait_for_the_refresh(self) -> None:
        moved = {**self.base, "lastUsed": "2026-01-01T00:00:05Z", "demandJobsPerMinute": 2.1, "useRank": 1010.0}
        assert not is_status_write_due(self.base, moved, since_write_s=29.0, refresh_s=30.0)
        assert is_status_write_due(self.base, moved, since_write_s=30.0, refresh_s=30.0)
        assert not is_status_write_due(self.base, dict(self.base), since_write_s=1e9, refresh_s=30.0)

    def test_a_rank_that_moved_a_minute_or_more_is_written_at_once(self) -> None:
        moved = {**self.base, "useRank": 1000.0 + userank.PUBLISH_MIN_CHANGE_S}
        assert is_status_write_due(self.base, moved, since_write_s=0.0, refresh_s=30.0)
        unpublished = {k: v for k, v in self.base.items() if k not in ("useRank", "useRankCountedThrough")}
        assert is_status_write_due(unpublished, self.base, since_write_s=0.0, refresh_s=30.0)


class TestPublishedDigest:
    """ModelCache status.sha256: what agents verify copies fetched from each other against."""

    def copies(self, *digests: str | None) -> Any:
        from stoker.operator.replica_shell import copies_by_model
        from stoker.operator.state import agent_from_body

        agents = [agent_from_body({
            "apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
            "metadata": {"name": f"a{i}", "namespace": "ns", "uid": f"a{i}", "resourceVersion": "1"},
            "spec": {}, "status": {"models": [{"name": "sd", "tier": "disk", "sizeBytes": 10,
                                               **({"sha256": d} if d else {})}]}}) for i, d in enumerate(digests)]
        return copies_by_model(agents, {}).get("sd", Copies([]))

    def observed(self, *, spec_sha: str | None = None, status_sha: str | None = None) -> Any:
        from stoker.operator.state import model_from_body

        body = model({"sha256": status_sha} if status_sha else None)
        if spec_sha:
            body["spec"]["source"]["sha256"] = spec_sha
        return model_from_body(body)

    def test_the_specs_digest_wins(self) -> None:
        from stoker.operator.replica_shell import published_sha256

        assert published_sha256(self.observed(spec_sha="a" * 64), self.copies("b" * 64)) == "a" * 64

    def test_without_one_the_first_copys_digest_is_published_and_kept(self) -> None:
        from stoker.operator.replica_shell import published_sha256

        assert published_sha256(self.observed(), self.copies()) is None
        assert published_sha256(self.observed(), self.copies(None)) is None
        first = published_sha256(self.observed(), self.copies("c" * 64, "d" * 64, "d" * 64))
        assert first == "d" * 64  # the digest most copies have
        # once published it stays, whatever copies appear later
        assert published_sha256(self.observed(status_sha="c" * 64), self.copies("d" * 64)) == "c" * 64

    def test_the_shell_writes_it_into_the_status(self) -> None:
        state, shell, writer = shell_with()
        state.upsert_agent({"apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
                            "metadata": {"name": "a1", "namespace": "ns", "uid": "a1", "resourceVersion": "1"},
                            "spec": {}, "status": {"models": [{"name": "sd", "tier": "disk", "sizeBytes": 10,
                                                               "sha256": "e" * 64}]}})
        shell.apply_once(now=T0, now_mono=0.0)
        assert writer.writes and writer.writes[-1]["sha256"] == "e" * 64


def test_copies_two_agents_of_the_peer_tier_share_are_written_as_their_duplicates() -> None:
    def ca(name: str, models: list[str], *, peer: bool = True) -> dict[str, Any]:
        status: dict[str, Any] = {"models": [{"name": m, "tier": "disk", "sizeBytes": 10} for m in models],
                                  "slots": 1}
        if peer:
            status["peer"] = {"url": "http://10.0.0.1:8471"}
        return {"apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
                "metadata": {"name": name, "namespace": "ns", "uid": name, "resourceVersion": "1"},
                "spec": {}, "status": status}

    state, shell, writer = shell_with()
    patches: list[tuple[str, dict[str, Any]]] = []
    writer.fake.patch = lambda kind, name, body, **kw: (patches.append((name, body)), ca(name, []))[1]  # type: ignore[attr-defined]
    for body in (ca("a1", ["sd", "x"]), ca("a2", ["sd"]), ca("a3", ["x"], peer=False)):
        state.upsert_agent(body)
        state.upsert_lease({"metadata": {"name": body["metadata"]["name"], "namespace": "ns", "resourceVersion": "1"},
                            "spec": {"renewTime": "2026-01-01T00:00:00Z", "leaseDurationSeconds": 15,
                                     "holderIdentity": body["metadata"]["name"]}}, now_mono=0.0)
    shell.lease_grace_s = None
    shell.apply_once(now=T0, now_mono=0.0)
    assert sorted(patches) == [("a1", {"spec": {"duplicates": ["sd"]}}), ("a2", {"spec": {"duplicates": ["sd"]}})]


def test_an_agent_that_left_the_peer_tier_has_its_duplicates_cleared() -> None:
    state, shell, writer = shell_with()
    patches: list[tuple[str, dict[str, Any]]] = []
    # a1 no longer advertises a peer endpoint: its last word on duplicates must not linger
    a1 = {"apiVersion": "stoker.dev/v1alpha1", "kind": "CacheAgent",
          "metadata": {"name": "a1", "namespace": "ns", "uid": "a1", "resourceVersion": "1"},
          "spec": {"duplicates": ["sd"]},
          "status": {"models": [{"name": "sd", "tier": "disk", "sizeBytes": 10}], "slots": 1}}
    writer.fake.patch = lambda kind, name, body, **kw: (  # type: ignore[attr-defined]
        patches.append((name, body)), {**a1, "metadata": {**a1["metadata"], "resourceVersion": "2"}, **body})[1]
    state.upsert_agent(a1)
    shell.lease_grace_s = None
    shell.apply_once(now=T0, now_mono=0.0)
    assert patches == [("a1", {"spec": {"duplicates": []}})]
