"""A real one-node Kubernetes cluster, started as ordinary processes for end-to-end tests.

etcd and kube-apiserver (stoker.testing.controlplane), kube-controller-manager,
kube-scheduler, kube-proxy and a kubelet built from the Go module proxy
(hack/build-node.sh), and containerd with runc and the CNI plugins from Debian's
packages (hack/setup-node.sh). Pods really run: the images come from the local
containers storage (hack/build-images.sh) and are imported into containerd's `k8s.io`
namespace.

Networking stays on this machine. The cluster makes one Linux bridge with an address
from 198.18.0.0/15 (reserved for benchmarking, never routed), the API server and the
kubelet listen on that address, pods get addresses on the bridge from the CNI bridge
plugin and a route only to the bridge subnet and the Service range (no default route),
and nothing is masqueraded or forwarded. Tests serve model files on `gateway_ip`,
which pods and this process both reach.

Needs root, cgroups with the memory, cpu, cpuacct and cpuset controllers, and the
kernel's bridge, veth, overlayfs and iptables NAT support. Works on a hybrid cgroup v1
host: the kubelet runs with `failCgroupV1: false` and the cgroupfs driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from stoker.testing import controlplane
from stoker.testing.controlplane import ControlPlane, ControlPlaneError, ServingCert

log = logging.getLogger(__name__)

REPO_ROOT = controlplane.REPO_ROOT
NODE_NAME = "stoker-e2e-node"
BRIDGE = "stoker-e2e0"
# 198.18.0.0/15 is reserved for network benchmarks (RFC 2544): nothing real lives there.
GATEWAY_IP = "198.18.0.1"
POD_CIDR = "198.18.0.0/24"
SERVICE_CIDR = "198.18.1.0/24"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
# Identities of the cluster's components (static tokens); RBAC's bootstrap roles know them.
COMPONENT_USERS = {
    f"system:node:{NODE_NAME}": "system:nodes",
    "system:kube-controller-manager": "",
    "system:kube-scheduler": "",
    "system:kube-proxy": "",
}


class ClusterError(ControlPlaneError):
    """The cluster could not be set up or started; the message says which part and why."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A running one-node cluster."""

    control_plane: ControlPlane
    workdir: pathlib.Path
    node_name: str
    gateway_ip: str
    """The bridge's address: pods reach this machine here, and so does the test process."""
    timings_s: Mapping[str, float]
    """How long each start-up step took."""

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.control_plane.kubeconfig

    def kubectl(self, *args: str, check: bool = True, input_text: str | None = None,
                timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl(*args, check=check, input_text=input_text, timeout_s=timeout_s)

    def log_tails(self, lines: int = 60) -> str:
        """The last lines of every component's log, for failure messages."""
        return "\n".join(f"--- {p.name} ---\n{controlplane._tail(p, lines)}" for p in sorted(self.workdir.glob("*.log")))


def _run(cmd: Sequence[str], *, check: bool = True, timeout_s: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, **kwargs)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def _script_output(script: str, *args: str, timeout_s: float = 5400) -> str:
    """Run one of the repo's hack/ scripts (they print what they made last)."""
    path = REPO_ROOT / "hack" / script
    proc = subprocess.run(["bash", str(path), *args], stdout=subprocess.PIPE, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise ClusterError(f"{path} failed with exit code {proc.returncode}; see its output above")
    return proc.stdout


def find_node_binaries() -> pathlib.Path:
    """The folder with kubelet, kube-scheduler, kube-controller-manager and kube-proxy."""
    if env := os.environ.get("STOKER_NODE_BIN"):
        return pathlib.Path(env)
    return pathlib.Path(_script_output("build-node.sh").strip().splitlines()[-1])


def build_images(*names: str) -> dict[str, str]:
    """Build (or reuse) the local images; returns name → image reference."""
    out = _script_output("build-images.sh", *names)
    return dict(line.split("=", 1) for line in out.split() if "=" in line)


def check_host() -> None:
    """Fail early, saying what is missing, when this machine cannot run the cluster."""
    if os.geteuid() != 0:
        raise ClusterError("the test cluster needs root (it creates a bridge, mounts and cgroups)")
    _script_output("setup-node.sh", timeout_s=1800)
    missing = [tool for tool in ("containerd", "runc", "ctr", "ip", "iptables", "openssl", "buildah")
               if shutil.which(tool) is None]
    if missing:
        raise ClusterError(f"missing tools: {', '.join(missing)}; run: bash hack/setup-node.sh")
    if not any(pathlib.Path(d, "bridge").exists() for d in CNI_BIN_DIRS):
        raise ClusterError(f"the CNI bridge plugin is not in {' or '.join(CNI_BIN_DIRS)}; "
                           "install Debian's containernetworking-plugins")


# ---- certificates ----------------------------------------------------------------------

def _issue_certs(certs: pathlib.Path) -> dict[str, pathlib.Path]:
    """A CA, the API server's serving certificate (for the bridge address, loopback and the
    `kubernetes` Service), the kubelet's serving certificate and the API server's client
    certificate towards the kubelet."""
    certs.mkdir(parents=True, exist_ok=True)
    ca_key, ca = certs / "ca.key", certs / "ca.crt"
    _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
          "-days", "2", "-subj", "/CN=stoker-e2e-ca"])
    first_service_ip = SERVICE_CIDR.rsplit(".", 1)[0] + ".1"

    def issue(name: str, subject: str, ext: str) -> None:
        key, csr, crt, extfile = (certs / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
        extfile.write_text(ext)
        _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
              "-subj", subject])
        _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
              "-out", str(crt), "-days", "2", "-extfile", str(extfile)])

    issue("apiserver", "/CN=kube-apiserver",
          "subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,"
          "DNS:kubernetes.default.svc.cluster.local,DNS:localhost,"
          f"IP:{GATEWAY_IP},IP:127.0.0.1,IP:{first_service_ip}\nextendedKeyUsage=serverAuth\n")
    issue("kubelet", f"/CN={NODE_NAME}", f"subjectAltName=DNS:{NODE_NAME},IP:{GATEWAY_IP}\nextendedKeyUsage=serverAuth\n")
    issue("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
          "extendedKeyUsage=clientAuth\n")
    files = {f"{name}.{ext}": certs / f"{name}.{ext}"
             for name in ("apiserver", "kubelet", "apiserver-kubelet-client") for ext in ("crt", "key")}
    return {**files, "ca": ca}


# ---- network ---------------------------------------------------------------------------

def _bridge_exists() -> bool:
    return _run(["ip", "link", "show", BRIDGE], check=False).returncode == 0


def _make_bridge() -> None:
    if _bridge_exists():  # left over from a run that was killed
        _remove_bridge()
    prefix = POD_CIDR.split("/")[1]
    _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _run(["ip", "addr", "add", f"{GATEWAY_IP}/{prefix}", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "up"])
    # Host traffic to a Service address that kube-proxy does not translate stays on the bridge.
    _run(["ip", "route", "replace", SERVICE_CIDR, "dev", BRIDGE])


def _remove_bridge() -> None:
    _run(["ip", "route", "del", SERVICE_CIDR, "dev", BRIDGE], check=False)
    _run(["ip", "link", "del", BRIDGE], check=False)


def _cni_config(conf_dir: pathlib.Path) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = {
        "cniVersion": "1.0.0",
        "name": "stoker-e2e",
        "plugins": [
            {
                "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "rangeStart": POD_CIDR.rsplit(".", 1)[0] + ".10",
                                 "gateway": GATEWAY_IP}]],
                    # No default route: pods reach the bridge subnet and the Services, nothing else.
                    "routes": [{"dst": SERVICE_CIDR}],
                    "dataDir": str(conf_dir.parent / "cni-ipam"),
                },
            },
        ],
    }
    (conf_dir / "10-stoker-e2e.conflist").write_text(json.dumps(conf, indent=2))


# ---- containerd ------------------------------------------------------------------------

def _containerd_config(work: pathlib.Path, root: pathlib.Path, pause_image: str) -> pathlib.Path:
    cni_bin = next(d for d in CNI_BIN_DIRS if pathlib.Path(d, "bridge").exists())
    path = work / "containerd.toml"
    path.write_text(textwrap.dedent(f"""\
        version = 2
        root = "{root}"
        state = "{work / 'containerd-state'}"
        [grpc]
          address = "{work / 'containerd.sock'}"
        [ttrpc]
          address = "{work / 'containerd.sock.ttrpc'}"
        [debug]
          level = "warn"
        [plugins."io.containerd.grpc.v1.cri"]
          sandbox_image = "{pause_image}"
          disable_tcp_service = true
          stream_server_address = "127.0.0.1"
          stream_server_port = "0"
          netns_mounts_under_state_dir = true
          # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which root lacks on some sandboxed hosts:
          # keep pods at or above containerd's own score.
          restrict_oom_score_adj = true
          enable_selinux = false
          disable_apparmor = true
          [plugins."io.containerd.grpc.v1.cri".cni]
            bin_dir = "{cni_bin}"
            conf_dir = "{work / 'cni' / 'net.d'}"
          [plugins."io.containerd.grpc.v1.cri".containerd]
            snapshotter = "overlayfs"
            default_runtime_name = "runc"
            [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
              runtime_type = "io.containerd.runc.v2"
              [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
                BinaryName = "{shutil.which('runc')}"
                SystemdCgroup = false
        """))
    return path


def _ctr(work: pathlib.Path, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ctr", "--address", str(work / "containerd.sock"), "--namespace", "k8s.io", *args],
                timeout_s=timeout_s, check=check)


def import_images(work: pathlib.Path, images: Mapping[str, str], *, timeout_s: float = 1800) -> list[str]:
    """Copy the images from the local containers storage into containerd's k8s.io namespace,
    skipping those it already holds (their tags are content hashes). Returns the imported ones.

    An image with a new tag is streamed whole (docker-archive): containerd keeps the blobs
    and unpacked layers it already has, but the stream still carries every layer, so a
    changed app layer on the agent image costs minutes (its Python packages are gigabytes)."""
    present = set(_ctr(work, "images", "ls", "-q").stdout.split())
    imported = []
    for ref in images.values():
        if ref in present:
            continue
        with subprocess.Popen(["buildah", "push", "--quiet", ref, f"docker-archive:/dev/stdout:{ref}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as push:
            assert push.stdout is not None and push.stderr is not None
            load = subprocess.run(["ctr", "--address", str(work / "containerd.sock"), "--namespace", "k8s.io",
                                   "images", "import", "-"], stdin=push.stdout,
                                  capture_output=True, text=True, timeout=timeout_s)
            push.stdout.close()
            push_err = push.stderr.read().decode(errors="replace")
            push.wait(timeout=60)
        if push.returncode != 0 or load.returncode != 0:
            raise ClusterError(f"importing {ref} into containerd failed: {push_err.strip()} {load.stderr.strip()}")
        imported.append(ref)
    # Older builds of the same images share all but their last layer; drop their tags so
    # that containerd's garbage collector frees what only they used.
    repositories = {ref.rsplit(":", 1)[0] for ref in images.values()}
    stale = [ref for ref in present if ref.rsplit(":", 1)[0] in repositories and ref not in images.values()]
    if stale:
        _ctr(work, "images", "rm", *stale, check=False)
    return imported


# ---- component configuration -----------------------------------------------------------

def _kubelet_config(work: pathlib.Path, certs: Mapping[str, pathlib.Path], healthz_port: int) -> pathlib.Path:
    path = work / "kubelet.yaml"
    path.write_text(textwrap.dedent(f"""\
        apiVersion: kubelet.config.k8s.io/v1beta1
        kind: KubeletConfiguration
        # Hosts with hybrid cgroups (v1 controllers) are still supported when asked for.
        failCgroupV1: false
        cgroupDriver: cgroupfs
        address: {GATEWAY_IP}
        port: 10250
        readOnlyPort: 0
        healthzBindAddress: 127.0.0.1
        healthzPort: {healthz_port}
        tlsCertFile: {certs['kubelet.crt']}
        tlsPrivateKeyFile: {certs['kubelet.key']}
        authentication:
          anonymous: {{enabled: false}}
          webhook: {{enabled: true}}
          x509: {{clientCAFile: {certs['ca']}}}
        authorization: {{mode: Webhook}}
        failSwapOn: false
        podLogsDir: {work / 'pod-logs'}
        clusterDomain: cluster.local
        resolvConf: /etc/resolv.conf
        registerNode: true
        serializeImagePulls: false
        # The images are imported, not pulled: never garbage-collect them, and never evict
        # pods for disk that other work on this machine uses.
        imageGCHighThresholdPercent: 100
        imageGCLowThresholdPercent: 99
        evictionHard: {{memory.available: 100Mi, nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
        enforceNodeAllocatable: []
        cgroupsPerQOS: true
        protectKernelDefaults: false
        makeIPTablesUtilChains: false
        localStorageCapacityIsolation: true
        maxPods: 30
        nodeStatusUpdateFrequency: 4s
        syncFrequency: 10s
        fileCheckFrequency: 20s
        containerRuntimeEndpoint: unix://{work / 'containerd.sock'}
        """))
    return path


def _proxy_config(work: pathlib.Path, kubeconfig: pathlib.Path, healthz_port: int, metrics_port: int) -> pathlib.Path:
    path = work / "kube-proxy.yaml"
    path.write_text(textwrap.dedent(f"""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: iptables
        clientConnection: {{kubeconfig: {kubeconfig}}}
        hostnameOverride: {NODE_NAME}
        bindAddress: {GATEWAY_IP}
        healthzBindAddress: 127.0.0.1:{healthz_port}
        metricsBindAddress: 127.0.0.1:{metrics_port}
        clusterCIDR: {POD_CIDR}
        nodePortAddresses: ["{GATEWAY_IP}/32"]
        # Leave the host's sysctls alone (no conntrack table resize, no route_localnet).
        conntrack: {{maxPerCore: 0, min: 0}}
        iptables: {{localhostNodePorts: false, masqueradeAll: false}}
        """))
    return path


# ---- lifecycle ---------------------------------------------------------------------------

def wait_for(what: str, check: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.5,
             on_timeout: Callable[[], str] = lambda: "") -> None:
    """Poll `check` until it returns true; raise ClusterError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise ClusterError(f"{what} not reached within {timeout_s:.0f}s\n{on_timeout()}")


def _mounts_under(path: pathlib.Path) -> list[str]:
    prefix = str(path.resolve())
    mounts = []
    for line in pathlib.Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if target == prefix or target.startswith(prefix + "/"):
            mounts.append(target)
    return mounts


def _unmount_all(path: pathlib.Path) -> None:
    for target in sorted(set(_mounts_under(path)), key=len, reverse=True):
        _run(["umount", "-l", target], check=False)


def _remove_kube_iptables_rules() -> None:
    """Remove the KUBE-* chains the kubelet and kube-proxy added, and the jumps into them
    (kube-proxy --cleanup leaves the kubelet's KUBE-FIREWALL)."""
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        dump = _run([f"{tool}-save"], check=False).stdout
        table, chains = "", []
        for line in dump.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":KUBE-"):
                chains.append((table, line[1:].split()[0]))
            elif line.startswith("-A ") and " -j KUBE-" in line and not line.split()[1].startswith("KUBE-"):
                _run([tool, "-t", table, "-D", *shlex.split(line)[1:]], check=False)
        for table, chain in chains:
            _run([tool, "-t", table, "-F", chain], check=False)
        for table, chain in chains:
            _run([tool, "-t", table, "-X", chain], check=False)


def _remove_pod_cgroups() -> None:
    """Remove the kubelet's (now empty) kubepods cgroups from every hierarchy."""
    for top in pathlib.Path("/sys/fs/cgroup").glob("*/kubepods"):
        for cgroup in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def _stop_containers(work: pathlib.Path) -> None:
    """Kill whatever containers are left (their shims outlive containerd) and remove them."""
    if not (work / "containerd.sock").exists():
        return
    tasks = _ctr(work, "tasks", "ls", "-q", check=False).stdout.split()
    for task in tasks:
        _ctr(work, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
    for task in tasks:
        for _ in range(20):
            if _ctr(work, "tasks", "delete", task, check=False).returncode == 0:
                break
            time.sleep(0.25)
    for container in _ctr(work, "containers", "ls", "-q", check=False).stdout.split():
        _ctr(work, "containers", "delete", container, check=False)


def _node_ready(cp: ControlPlane) -> bool:
    proc = cp.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
    if proc.returncode != 0:
        return False
    conditions = json.loads(proc.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _delete_all_pods(cp: ControlPlane, timeout_s: float) -> None:
    """Delete every pod so that the kubelet stops their sandboxes (CNI teardown included)."""
    cp.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=5", "--wait=false",
               check=False, timeout_s=60)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc = cp.kubectl("get", "pods", "--all-namespaces", "-o", "name", check=False, timeout_s=30)
        if proc.returncode == 0 and not proc.stdout.strip():
            return
        time.sleep(1)


@contextlib.contextmanager
def run_cluster(*, images: Mapping[str, str], workdir: pathlib.Path | None = None,
                crd_dir: pathlib.Path | None = None, containerd_root: pathlib.Path | None = None,
                startup_timeout_s: float = 300) -> Iterator[Cluster]:
    """Start a one-node cluster, yield it, and tear everything down on exit: pods,
    processes, mounts, the bridge and kube-proxy's iptables rules.

    `images` must include `pause` (the sandbox image); all are imported into the node.
    `containerd_root` keeps containerd's content store between runs (so unchanged images
    are not imported again); by default it lives under ~/.cache/stoker/node/.
    """
    check_host()
    cache = pathlib.Path(os.environ.get("STOKER_CACHE") or pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "stoker")
    (cache / "node").mkdir(parents=True, exist_ok=True)
    # One cluster per machine: they share the bridge's name and containerd's content store.
    lock = (cache / "node" / "cluster.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("another test cluster is running on this machine; waiting for it to stop")
        fcntl.flock(lock, fcntl.LOCK_EX)
    with lock:
        yield from _run_cluster(images=images, workdir=workdir, crd_dir=crd_dir, containerd_root=containerd_root,
                                startup_timeout_s=startup_timeout_s, cache=cache)


def _run_cluster(*, images: Mapping[str, str], workdir: pathlib.Path | None, crd_dir: pathlib.Path | None,
                 containerd_root: pathlib.Path | None, startup_timeout_s: float,
                 cache: pathlib.Path) -> Iterator[Cluster]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    node_bin = find_node_binaries()
    timings["node binaries"] = time.perf_counter() - started
    owned = workdir is None
    work = pathlib.Path(tempfile.mkdtemp(prefix="stoker-e2e-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    root = containerd_root or cache / "node" / "containerd"
    root.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[str, subprocess.Popen[bytes], pathlib.Path]] = []

    def spawn(name: str, cmd: list[str]) -> None:
        logfile = work / f"{name}.log"
        procs.append((name, controlplane._spawn(cmd, logfile), logfile))

    def alive() -> None:
        for name, proc, logfile in procs:
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode}; last log lines:\n"
                                   f"{controlplane._tail(logfile)}")

    cp: ControlPlane | None = None
    kube_proxy: pathlib.Path | None = None
    try:
        t = time.perf_counter()
        _make_bridge()
        _cni_config(work / "cni" / "net.d")
        certs = _issue_certs(work / "certs")
        timings["bridge and certificates"] = time.perf_counter() - t

        t = time.perf_counter()
        with contextlib.ExitStack() as stack:
            cp = stack.enter_context(controlplane.run_control_plane(
                workdir=work / "control-plane", crd_dir=crd_dir, startup_timeout_s=startup_timeout_s,
                user_groups=COMPONENT_USERS, bind_address=GATEWAY_IP, service_cidr=SERVICE_CIDR,
                serving_cert=ServingCert(cert=certs["apiserver.crt"], key=certs["apiserver.key"], ca=certs["ca"]),
                pod_admission=True,
                extra_apiserver_args=["--kubelet-client-certificate", str(certs["apiserver-kubelet-client.crt"]),
                                      "--kubelet-client-key", str(certs["apiserver-kubelet-client.key"]),
                                      "--kubelet-certificate-authority", str(certs["ca"]),
                                      "--kubelet-preferred-address-types", "InternalIP"]))
            timings["etcd and kube-apiserver"] = time.perf_counter() - t

            t = time.perf_counter()
            spawn("containerd", ["containerd", "--config", str(_containerd_config(work, root, images["pause"]))])
            wait_for("containerd's socket", lambda: (alive(), (work / "containerd.sock").exists())[1],
                     timeout_s=60, interval_s=0.2)
            wait_for("containerd answering", lambda: _ctr(work, "version", check=False).returncode == 0,
                     timeout_s=60, interval_s=0.2)
            timings["containerd"] = time.perf_counter() - t
            t = time.perf_counter()
            imported = import_images(work, images)
            timings["image import"] = time.perf_counter() - t
            log.info("imported %s into the node (%.1fs)", imported or "nothing new", timings["image import"])

            t = time.perf_counter()
            kubeconfig = {user: cp.kubeconfig_for(user) for user in COMPONENT_USERS}
            ports = [controlplane._free_port() for _ in range(5)]
            spawn("kube-controller-manager", [
                str(node_bin / "kube-controller-manager"), "--kubeconfig", str(kubeconfig["system:kube-controller-manager"]),
                "--authentication-kubeconfig", str(kubeconfig["system:kube-controller-manager"]),
                "--authorization-kubeconfig", str(kubeconfig["system:kube-controller-manager"]),
                "--bind-address", "127.0.0.1", "--secure-port", str(ports[0]), "--leader-elect=false",
                "--root-ca-file", str(certs["ca"]), "--cluster-name", "stoker-e2e",
                # Each controller acts as its own service account (the bootstrap RBAC roles).
                "--use-service-account-credentials",
                "--service-cluster-ip-range", SERVICE_CIDR, "--allocate-node-cidrs=false",
                "--controllers", "*,-nodeipam,-bootstrapsigner,-tokencleaner", "--v", "1"])
            spawn("kube-scheduler", [
                str(node_bin / "kube-scheduler"), "--kubeconfig", str(kubeconfig["system:kube-scheduler"]),
                "--authentication-kubeconfig", str(kubeconfig["system:kube-scheduler"]),
                "--authorization-kubeconfig", str(kubeconfig["system:kube-scheduler"]),
                "--bind-address", "127.0.0.1", "--secure-port", str(ports[1]), "--leader-elect=false", "--v", "1"])
            kube_proxy = node_bin / "kube-proxy"
            spawn("kube-proxy", [str(kube_proxy), "--config",
                                 str(_proxy_config(work, kubeconfig["system:kube-proxy"], ports[2], ports[3])), "--v", "1"])
            spawn("kubelet", [
                str(node_bin / "kubelet"), "--config", str(_kubelet_config(work, certs, ports[4])),
                "--kubeconfig", str(kubeconfig[f"system:node:{NODE_NAME}"]),
                "--hostname-override", NODE_NAME, "--node-ip", GATEWAY_IP,
                "--root-dir", str(work / "kubelet"), "--cert-dir", str(work / "kubelet-pki"), "--v", "1"])
            cluster = Cluster(control_plane=cp, workdir=work, node_name=NODE_NAME, gateway_ip=GATEWAY_IP,
                              timings_s=timings)
            wait_for("node Ready", lambda: (alive(), _node_ready(cp))[1], timeout_s=startup_timeout_s, interval_s=1,
                     on_timeout=cluster.log_tails)
            wait_for("the default ServiceAccount",
                     lambda: cp.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
                     timeout_s=60, on_timeout=cluster.log_tails)
            timings["node components to Ready"] = time.perf_counter() - t
            timings["total"] = time.perf_counter() - started
            log.info("cluster ready: %s", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
            try:
                yield cluster
            finally:
                with contextlib.suppress(Exception):
                    _delete_all_pods(cp, timeout_s=60)
                for name, proc, _ in reversed(procs):
                    if name != "containerd":
                        controlplane._stop(proc)
    finally:
        with contextlib.suppress(Exception):
            _stop_containers(work)
        for _name, proc, _ in reversed(procs):
            controlplane._stop(proc)
        if kube_proxy is not None:  # remove the KUBE-* chains it added
            _run([str(kube_proxy), "--cleanup"], check=False, timeout_s=60)
        _remove_kube_iptables_rules()
        _unmount_all(work)
        _unmount_all(root)
        _remove_pod_cgroups()
        _remove_bridge()
        if owned:
            shutil.rmtree(work, ignore_errors=True)
