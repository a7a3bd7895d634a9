"""--log-format json: one object per line, with the job, model and agent a call site passes."""

from __future__ import annotations

import json
import logging

from stoker import logs


def test_a_json_record_carries_the_component_the_static_agent_and_the_fields_passed_in_extra() -> None:
    fmt = logs.formatter("json", component="stoker-agent", static={"agent": "agent-7"})
    record = logging.LogRecord("stoker.agent.jobs", logging.INFO, __file__, 1, "job %s attempt %d started",
                               ("fox", 2), None)
    record.job, record.model, record.attempt = "team-a/fox", "sd15", 2
    line = fmt.format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "job fox attempt 2 started" and obj["level"] == "INFO"
    assert obj["logger"] == "stoker.agent.jobs" and obj["component"] == "stoker-agent" and obj["agent"] == "agent-7"
    assert (obj["job"], obj["model"], obj["attempt"]) == ("team-a/fox", "sd15", 2) and obj["time"]


def test_text_stays_the_default_format() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain", (), None)
    assert logs.formatter("text", component="c").format(record).endswith("WARNING x: plain")
