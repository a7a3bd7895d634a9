"""The CRD upgrade path: the CRDs are templates of the chart, so `helm upgrade` updates them, and
with crds.keep `helm uninstall` leaves them and the objects in place. On a control plane of its
own: the session's shared one has CRDs that no release owns."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest
import yaml

from stoker import api, crdgen
from stoker.testing import controlplane

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "stoker"


@pytest.fixture(scope="module")
def bare_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[controlplane.ControlPlane]:
    with controlplane.run_control_plane(workdir=tmp_path_factory.mktemp("bare-control-plane")) as cp:
        yield cp


def old_chart(tmp_path: pathlib.Path) -> pathlib.Path:
    """The chart as an earlier version: its ModelCache CRD lacks the last printer column."""
    chart = tmp_path / "stoker-old"
    shutil.copytree(CHART, chart)
    crd = crdgen.build_crd(api.ModelCache)
    crd["spec"]["versions"][0]["additionalPrinterColumns"].pop()
    (chart / "templates" / "crds" / "stoker.dev_modelcaches.yaml").write_text(crdgen.chart_crd_template(crd))
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    (chart / "Chart.yaml").write_text(yaml.safe_dump({**meta, "version": "0.0.1"}))
    return chart


def test_helm_upgrade_updates_the_crds_and_uninstall_keeps_them(helm: str, bare_control_plane, tmp_path) -> None:
    cp = bare_control_plane
    kube = ["--kubeconfig", str(cp.kubeconfig), "--namespace", "stoker"]

    def columns() -> list[str]:
        crd = json.loads(cp.kubectl("get", "crd", "modelcaches.stoker.dev", "-o", "json").stdout)
        return [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]

    cp.kubectl("create", "namespace", "stoker")
    proc = subprocess.run([helm, "install", "stoker", str(old_chart(tmp_path)), *kube],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    newest = crdgen.build_crd(api.ModelCache)["spec"]["versions"][0]["additionalPrinterColumns"][-1]["name"]
    before = columns()
    assert newest not in before
    cp.kubectl("-n", "stoker", "wait", "--for=condition=Established", "crd/modelcaches.stoker.dev")
    cp.kubectl("-n", "stoker", "apply", "-f", str(REPO / "examples" / "modelcache.yaml"))

    proc = subprocess.run([helm, "upgrade", "stoker", str(CHART), *kube], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert columns() == [*before, newest]
    crd = json.loads(cp.kubectl("get", "crd", "modelcaches.stoker.dev", "-o", "json").stdout)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == "stoker"

    proc = subprocess.run([helm, "uninstall", "stoker", *kube], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "kept due to the resource policy" in proc.stdout + proc.stderr
    # The CRDs and the objects they hold outlive the release.
    cp.kubectl("get", "crd", "modelcaches.stoker.dev", "generationjobs.stoker.dev", "cacheagents.stoker.dev")
    assert cp.kubectl("-n", "stoker", "get", "modelcache", "sd15-base", "-o", "name").stdout.strip() == \
        "modelcache.stoker.dev/sd15-base"
    assert not cp.kubectl("-n", "stoker", "get", "deployments", "-o", "name").stdout.strip()
    # Installing the release again adopts the CRDs it left behind (they still carry its ownership).
    proc = subprocess.run([helm, "install", "stoker", str(CHART), *kube], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert cp.kubectl("-n", "stoker", "get", "modelcache", "sd15-base", "-o", "name").stdout.strip()
