"""What a job of a Failed model is told: why, and what actually brings the model back."""

from __future__ import annotations

from stoker.operator.failure import unavailable_message
from stoker.operator.sourcehealth import SourceHealthSettings, SourceVerdict


def test_a_permanent_failure_says_to_recreate_the_modelcache_or_fix_the_secret_and_when_jobs_try_again() -> None:
    verdict = SourceVerdict("HTTPForbidden", "ns/sd: the server answered 403", 1, 1, permanent=True)
    message = unavailable_message("sd", verdict, SourceHealthSettings(permanent_max_age_s=3600))
    assert message.startswith("model sd cannot be fetched (HTTPForbidden: ns/sd: the server answered 403)")
    assert "delete the ModelCache and create it again" in message
    assert "Secret" in message and "60 min" in message
    assert "replace the ModelCache's source" not in message, "url and sha256 cannot be changed in place"


def test_a_source_that_is_down_says_to_submit_again_once_it_is_back() -> None:
    verdict = SourceVerdict("HTTPServerError", "6 fetch failures on 3 agent(s)", 6, 3)
    message = unavailable_message("sd", verdict, SourceHealthSettings())
    assert message.endswith("submit the job again once the source is back")
