"""The end-to-end cluster's network stays on this machine: its ranges collide with nothing
here, pods get no default route, and nothing is masqueraded."""

from __future__ import annotations

import ipaddress
import json
import pathlib
import shutil
import subprocess

import pytest

from stoker.testing import cluster

BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544: never routed


def test_the_pod_and_service_ranges_are_reserved_and_apart() -> None:
    pods, services = ipaddress.ip_network(cluster.POD_CIDR), ipaddress.ip_network(cluster.SERVICE_CIDR)
    assert pods.subnet_of(BENCHMARK_RANGE) and services.subnet_of(BENCHMARK_RANGE)
    assert not pods.overlaps(services)
    assert ipaddress.ip_address(cluster.GATEWAY_IP) in pods


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")
def test_no_address_or_route_of_this_host_falls_in_the_cluster_ranges() -> None:
    ranges = [ipaddress.ip_network(cluster.POD_CIDR), ipaddress.ip_network(cluster.SERVICE_CIDR)]
    addrs = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout)
    routes = json.loads(subprocess.run(["ip", "-j", "route"], capture_output=True, text=True, check=True).stdout)
    for link in addrs:
        if link["ifname"] == cluster.BRIDGE:  # a cluster that is running right now
            continue
        for info in link.get("addr_info", []):
            net = ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False)
            assert not any(net.overlaps(r) for r in ranges if r.version == net.version), (link["ifname"], net)
    for route in routes:
        if route.get("dev") == cluster.BRIDGE or route["dst"] == "default":
            continue
        net = ipaddress.ip_network(route["dst"], strict=False)
        assert not any(net.overlaps(r) for r in ranges), route


def test_pods_get_a_route_to_the_services_only_and_no_masquerading(tmp_path: pathlib.Path) -> None:
    cluster._cni_config(tmp_path / "net.d")
    [conf] = json.loads((tmp_path / "net.d" / "10-stoker-e2e.conflist").read_text())["plugins"]
    assert conf["type"] == "bridge" and conf["bridge"] == cluster.BRIDGE
    assert conf["ipMasq"] is False
    assert conf["ipam"]["routes"] == [{"dst": cluster.SERVICE_CIDR}]
    [[subnet]] = conf["ipam"]["ranges"]
    assert subnet["subnet"] == cluster.POD_CIDR and subnet["gateway"] == cluster.GATEWAY_IP
