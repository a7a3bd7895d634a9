"""Faults of the agent itself: told apart from source failures, remembered while they last."""

from __future__ import annotations

import errno

import pytest

from stoker.agent import faults
from stoker.agent.jobs import JobFailed, _as_job_failure
from stoker.agent.loader import LoaderError


@pytest.mark.parametrize(("exc", "reason"), [
    (OSError(errno.ENOSPC, "No space left on device"), faults.DISK_FULL),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), faults.DISK_FULL),
    (OSError(errno.EIO, "Input/output error"), faults.DISK_ERROR),
    (OSError(errno.EROFS, "Read-only file system"), faults.DISK_ERROR),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), faults.OUT_OF_MEMORY),
    (MemoryError(), faults.OUT_OF_MEMORY),
    (ValueError("x"), None),
])
def test_exceptions_are_classified_as_local_faults_or_not(exc: BaseException, reason: str | None) -> None:
    assert faults.classify(exc) == reason


def test_a_bare_errno_from_a_failed_write_is_classified_too() -> None:
    assert faults.classify(os_errno=errno.ENOSPC) == faults.DISK_FULL


def test_a_load_that_fails_on_a_disk_error_is_a_retryable_local_fault_not_a_job_or_model_failure() -> None:
    err = LoaderError("reading m.safetensors failed: OSError: [Errno 5] Input/output error")
    err.__cause__ = OSError(errno.EIO, "Input/output error")
    failure = _as_job_failure(err)
    assert isinstance(failure, JobFailed) and failure.reason == faults.DISK_ERROR and failure.retryable
    assert "not of the model" in failure.message


def test_host_memory_running_out_in_a_load_is_a_local_fault() -> None:
    failure = _as_job_failure(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert isinstance(failure, JobFailed) and failure.reason == faults.OUT_OF_MEMORY and failure.retryable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_fault_degrades_the_agent_until_it_is_cleared_and_reports_when_it_began() -> None:
    clock, kicks = Clock(), []
    health = faults.AgentHealth(clock=clock, on_change=lambda: kicks.append(1))
    health.fault(faults.DISK_FULL, "no space")
    clock.now += 10
    health.fault(faults.DISK_FULL, "still no space")
    (view,) = health.faults()
    assert health.degraded and (view.since, view.last_seen, view.message) == (1000.0, 1010.0, "still no space")
    assert kicks == [1], "a fault seen again is not news"
    health.clear(faults.DISK_FULL, faults.DISK_ERROR)
    assert not health.degraded and kicks == [1, 1]


def test_a_fault_not_seen_again_for_its_ttl_drops_out() -> None:
    clock = Clock()
    health = faults.AgentHealth(clock=clock, ttl_s=60)
    health.fault(faults.OUT_OF_MEMORY, "oom")
    clock.now += 61
    assert health.faults() == () and not health.degraded
