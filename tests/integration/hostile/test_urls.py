"""Hostile URLs and credentials: a model or output URL that cannot or may not be used fails its job
once, with its reason, before anything is downloaded, generated or sent; a credential goes only
to the hosts declared for its Secret."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from stoker.testing.model_server import ModelServer
from stoker.testing.operator_harness import wait_for


@pytest.fixture
def elsewhere(suite) -> Iterator[ModelServer]:  # type: ignore[no-untyped-def]
    """A server on a loopback address that is not allowed: it must never be asked anything."""
    with ModelServer({"model.safetensors": suite.files["tiny-sd15"], "out.png": b""}, host="127.0.0.2") as server:
        yield server
    assert server.request_count() == 0


@pytest.fixture
def hub(suite) -> Iterator[ModelServer]:  # type: ignore[no-untyped-def]
    """A model server that wants the hub-token credential."""
    with ModelServer({"model.safetensors": suite.files["tiny-sd15"]}) as server:
        server.faults.required_token = suite.secret_value
        yield server


MODEL_URLS = [
    ("host-not-allowed", "{elsewhere}/model.safetensors", "not in the agent's download host allowlist"),
    ("invalid-idna", "http://xn--a.example/model.safetensors", "is not a valid URL"),
    ("port-out-of-range", "http://127.0.0.1:99999/model.safetensors", "port 99999"),
    ("port-zero", "http://127.0.0.1:0/model.safetensors", "port 0"),
    ("user-info", "http://someone:pw@127.0.0.1:1/model.safetensors", "user name or password"),
    ("empty-label", "http://a..example/model.safetensors", "invalid host name"),
]


@pytest.mark.parametrize(("url", "says"), [c[1:] for c in MODEL_URLS], ids=[c[0] for c in MODEL_URLS])
def test_a_model_url_that_may_not_be_used_fails_the_job_before_any_request(suite, unharmed, elsewhere, url, says) -> None:  # type: ignore[no-untyped-def]
    model, job = suite.name("mc"), suite.name("job")
    suite.model(model, url.format(elsewhere=elsewhere.base_url))
    suite.job(job, model=model)
    st = suite.failed(job, "URLNotAllowed", says=says)
    assert "pw" not in st.get("message", "")
    unharmed()


OUTPUT_URLS = [
    ("host-not-allowed", "{elsewhere}/out.png?sig=1", "OutputURLNotAllowed", "not among the hosts"),
    ("invalid-idna", "http://xn--a.example/out.png", "InvalidOutputURL", "is not a valid URL"),
    ("port-out-of-range", "http://127.0.0.1:70000/out.png", "InvalidOutputURL", "port 70000"),
    ("port-zero", "http://127.0.0.1:0/out.png", "InvalidOutputURL", "port 0"),
    ("user-info", "http://someone:pw@127.0.0.1:1/out.png", "InvalidOutputURL", "user name or password"),
    ("empty-label", "http://a..example/out.png", "InvalidOutputURL", "invalid host name"),
]


@pytest.mark.parametrize(("url", "reason", "says"), [c[1:] for c in OUTPUT_URLS], ids=[c[0] for c in OUTPUT_URLS])
def test_an_output_url_that_may_not_be_used_fails_the_job_once_before_any_gpu_work(
        suite, unharmed, elsewhere, url, reason, says) -> None:  # type: ignore[no-untyped-def]
    job = suite.name("job")
    suite.job(job, output_url=url.format(elsewhere=elsewhere.base_url), max_attempts=3)
    st = suite.failed(job, reason, says=says)
    assert st["attempt"] == 1 and len(st.get("history", [])) <= 1, st  # failed once, not on every attempt
    timings = st.get("timings") or {}
    assert "inferenceSeconds" not in timings and "loadSeconds" not in timings  # nothing was generated
    assert "sig=1" not in str(st) and "pw" not in str(st)
    unharmed()


class TestCredentials:
    def test_a_declared_secret_goes_to_its_declared_host(self, suite, unharmed, hub) -> None:  # type: ignore[no-untyped-def]
        model, job = suite.name("mc"), suite.name("job")
        suite.model(model, f"http://localhost:{hub.port}/model.safetensors", secret="hub-token")
        suite.job(job, model=model)
        assert suite.final(job)["phase"] == "Succeeded"
        assert [r.authorized for r in hub.requests] == [True]
        unharmed()

    def test_a_secret_is_not_sent_to_a_host_it_was_not_declared_for(self, suite, unharmed, hub) -> None:  # type: ignore[no-untyped-def]
        model, job = suite.name("mc"), suite.name("job")
        # 127.0.0.1 is a host the agent downloads from, but not one hub-token may go to
        suite.model(model, hub.url("model.safetensors"), secret="hub-token")
        suite.job(job, model=model)
        suite.failed(job, "CredentialHostNotAllowed", says="may be sent only to localhost")
        assert hub.request_count() == 0
        # The ModelCache says so too: its source counts as Failed, with the reason and an Event.
        condition = wait_for(lambda: next((c for c in (suite.admin.get("ModelCache", model).get("status") or {})
                                           .get("conditions", []) if c["type"] == "Failed" and c["status"] == "True"),
                                          None), timeout_s=20, message="the ModelCache's Failed condition")
        assert condition["reason"] == "CredentialHostNotAllowed" and "nothing was sent" in condition["message"]

        def events() -> list[str]:
            return [e.message or "" for e in suite.admin.core.list_namespaced_event(
                suite.ns, field_selector=f"involvedObject.name={model}").items]

        # The Event follows the status write, from the operator's background event writer.
        wait_for(lambda: any("CredentialHostNotAllowed" in m for m in events()), timeout_s=20,
                 message=lambda: f"the ModelCache's CredentialHostNotAllowed Event (events: {events()})")
        unharmed()

    def test_a_secret_that_was_not_declared_is_never_read_or_sent(self, suite, unharmed, hub) -> None:  # type: ignore[no-untyped-def]
        model, job = suite.name("mc"), suite.name("job")
        suite.model(model, f"http://localhost:{hub.port}/model.safetensors", secret="some-other-secret")
        suite.job(job, model=model)
        suite.failed(job, "CredentialNotAllowed", says="is not declared as a model credential")
        assert hub.request_count() == 0
        unharmed()

    def test_a_declared_variable_carries_its_secret_to_its_host(self, suite, unharmed, hub) -> None:  # type: ignore[no-untyped-def]
        hub.faults.required_token = suite.env_secret_value
        model, job = suite.name("mc"), suite.name("job")
        suite.model(model, f"http://localhost:{hub.port}/model.safetensors", secret="env-token")
        suite.job(job, model=model)
        assert suite.final(job)["phase"] == "Succeeded"
        unharmed()

    def test_a_redirect_never_carries_the_secret_to_the_next_host(self, suite, unharmed, hub) -> None:  # type: ignore[no-untyped-def]
        with ModelServer({"model.safetensors": suite.files["tiny-sd15"]}) as target:
            target.faults.required_token = suite.secret_value  # it would accept the secret, were it sent
            hub.faults.redirects = {"model.safetensors": target.url("model.safetensors")}
            model, job = suite.name("mc"), suite.name("job")
            suite.model(model, f"http://localhost:{hub.port}/model.safetensors", secret="hub-token",
                        sha256=hashlib.sha256(suite.files["tiny-sd15"].read_bytes()).hexdigest())
            suite.job(job, model=model)
            suite.failed(job, "HTTPUnauthorized")
            assert target.requests and not any(r.authorized for r in target.requests)
        unharmed()
