"""The pydantic API types agree with the examples and with the committed CRD YAML."""

from __future__ import annotations

import pathlib

import pydantic
import pytest
import yaml

from stoker import api, crdgen

REPO = pathlib.Path(__file__).resolve().parents[2]
KINDS = {r.kind_name: r for r in api.RESOURCES}


def documents(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize(("folder", "render"), [("crds", crdgen.render_crds),
                                               ("charts/stoker/templates/crds", crdgen.render_chart_crds)])
def test_committed_crd_yaml_matches_the_generator(folder: str, render) -> None:  # type: ignore[no-untyped-def]
    on_disk = {p.name: p.read_text() for p in (REPO / folder).glob("*.yaml")}
    assert on_disk == render(), f"{folder} is stale: run `stoker crds`"


def test_the_chart_crd_templates_carry_the_same_crds_as_crds_folder() -> None:
    plain, chart = crdgen.render_crds(), crdgen.render_chart_crds()
    assert plain.keys() == chart.keys()
    for name, text in chart.items():
        # Without the template lines (the condition, labels and keep annotation) it is the plain CRD.
        kept = [line for line in text.splitlines() if "{{" not in line and not line.startswith(("  labels:", "  annotations:",
                                                                                                 "    # helm", "    helm.sh"))]
        assert yaml.safe_load("\n".join(kept)) == yaml.safe_load(plain[name]), name


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_valid_examples_parse_as_api_types(path: pathlib.Path) -> None:
    for doc in documents(path):
        if doc["kind"] == "HorizontalPodAutoscaler":  # drives a ModelCache through its scale subresource
            assert doc["spec"]["scaleTargetRef"]["kind"] in KINDS
            continue
        obj = KINDS[doc["kind"]].model_validate(doc)
        assert obj.name == doc["metadata"]["name"]


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "invalid").glob("*.yaml")), ids=lambda p: p.name)
def test_invalid_examples_fail_pydantic_validation_too(path: pathlib.Path) -> None:
    [doc] = documents(path)
    cls = KINDS[doc["kind"]]
    with pytest.raises(pydantic.ValidationError):
        cls.model_validate(doc)


def test_crd_schemas_are_structural() -> None:
    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
                assert banned not in node, f"{banned} at {where}"
            if "properties" in node or "items" in node:
                assert node.get("type") in ("object", "array"), f"untyped node at {where}"
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for resource in api.RESOURCES:
        crd = crdgen.build_crd(resource)
        walk(crd["spec"]["versions"][0]["schema"], resource.kind_name)


def test_wire_form_uses_camel_case_and_drops_unset_fields() -> None:
    spec = api.GenerationJobSpec.model_validate({"model": "m", "params": {"prompt": "p", "cfgScale": 5}})
    wire = spec.wire()
    assert wire["params"]["cfgScale"] == 5
    assert "vae" not in wire
    assert wire["maxAttempts"] == 3


def test_every_string_and_list_the_agent_reports_has_a_maximum_length() -> None:
    status = crdgen.build_crd(api.CacheAgent)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    unbounded: list[str] = []

    def walk(node: dict, where: str) -> None:
        if node.get("type") == "string" and "enum" not in node and "maxLength" not in node:
            unbounded.append(where)
        if node.get("type") == "array":
            if "maxItems" not in node:
                unbounded.append(where)
            walk(node["items"], where + "[]")
        for name, prop in node.get("properties", {}).items():
            walk(prop, f"{where}.{name}")

    walk(status, "status")
    assert unbounded == []
