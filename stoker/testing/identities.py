"""Pod identities on the local control plane: service-account tokens bound to Pod objects.

A kubelet mounts into every pod a service-account token that the API server issued for that
pod (TokenRequest with a bound object reference); requests made with it carry the pod's name
and uid in the user's extra info (`authentication.kubernetes.io/pod-name`, `.../pod-uid`).
Without a kubelet, the tests make the same tokens themselves: create the Pod object, then ask
the TokenRequest API for a token bound to it. The control plane signs them with its
service-account key (see `controlplane.run_control_plane`).
"""

from __future__ import annotations

import dataclasses
import pathlib

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from stoker.testing.controlplane import ControlPlane

__all__ = ["PodIdentity", "pod_identity", "unbound_token"]

POD_NAME_CLAIM = "authentication.kubernetes.io/pod-name"


@dataclasses.dataclass(frozen=True)
class PodIdentity:
    """A Pod object and a token bound to it."""

    namespace: str
    pod: str
    pod_uid: str
    service_account: str
    token: str
    kubeconfig: pathlib.Path

    def api_client(self) -> client.ApiClient:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def ensure_service_account(core: client.CoreV1Api, namespace: str, name: str) -> None:
    try:
        core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))
    except ApiException as exc:
        if exc.status != 409:
            raise


def pod_identity(cp: ControlPlane, admin: client.ApiClient, namespace: str, pod: str, *,
                 service_account: str = "stoker-agent", expiration_s: int = 3600,
                 create_pod: bool = True) -> PodIdentity:
    """Create Pod `pod` running as `service_account` (unless it exists) and a token bound to it."""
    core = client.CoreV1Api(admin)
    ensure_service_account(core, namespace, service_account)
    if create_pod:
        core.create_namespaced_pod(namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name=pod),
            spec=client.V1PodSpec(service_account_name=service_account,
                                  containers=[client.V1Container(name="agent", image="stoker")])))
    uid = core.read_namespaced_pod(pod, namespace).metadata.uid
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
        audiences=[], expiration_seconds=expiration_s,
        bound_object_ref=client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod, uid=uid)))
    token = core.create_namespaced_service_account_token(service_account, namespace, request).status.token
    return PodIdentity(namespace=namespace, pod=pod, pod_uid=uid, service_account=service_account, token=token,
                       kubeconfig=cp.kubeconfig_with_token(f"{namespace}-{pod}", token))


def unbound_token(cp: ControlPlane, admin: client.ApiClient, namespace: str, *,
                  service_account: str = "stoker-agent") -> pathlib.Path:
    """A kubeconfig with a token of `service_account` bound to no pod (as a long-lived Secret token would be)."""
    core = client.CoreV1Api(admin)
    ensure_service_account(core, namespace, service_account)
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600))
    token = core.create_namespaced_service_account_token(service_account, namespace, request).status.token
    return cp.kubeconfig_with_token(f"{namespace}-{service_account}-unbound", token)
