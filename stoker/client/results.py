"""Bring a job's image back from wherever its agent delivered it (I/O).

`status.result.location` says where the image is:
- an http(s) URL (a PUT target given in the job, or a results store): fetched with GET;
  a presigned PUT URL's signature is not kept in status, so such a location is readable
  only when the bucket allows it, and the CLI says so;
- for an object in the agents' S3-compatible results store (its URL, path-style), a GET
  refused without credentials is signed with the user's own (`AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, optional `AWS_SESSION_TOKEN`, region from `AWS_REGION`), sent
  to that URL's host only;
- a path on the agent's results volume: read directly when this machine has it (agents
  running locally, as in `stoker demo`), else fetched from the agent's read-only results
  endpoint through the API server's pod proxy
  (`/api/v1/namespaces/NS/pods/POD:PORT/proxy/results/FILE`), which needs `get` on
  `pods/proxy` in the namespace and nothing else.
Every image is checked against status.result.sha256 before it is written.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import httpx
from kubernetes.client.exceptions import ApiException

from stoker.client.context import CliError, Cluster


def fetch_image(cluster: Cluster, job: dict[str, Any]) -> bytes:
    """The PNG of a Succeeded job, verified against its recorded sha256."""
    name = job["metadata"]["name"]
    status = job.get("status") or {}
    result = status.get("result")
    if status.get("phase") != "Succeeded" or not result:
        raise CliError(f"job {cluster.namespace}/{name} has no image: it is {status.get('phase', 'Pending')}"
                       + (f" ({status['reason']}: {status.get('message', '')})" if status.get("reason") else ""))
    location = str(result["location"])
    if location.startswith(("http://", "https://")):
        data = _http_get(location)
    else:
        data = _from_results_volume(cluster, job, location)
    digest = hashlib.sha256(data).hexdigest()
    if digest != result.get("sha256"):
        raise CliError(f"the image fetched from {location} does not match the job's sha256 "
                       f"({digest[:12]}... != {str(result.get('sha256'))[:12]}...); it was replaced or damaged")
    return data


def _http_get(url: str) -> bytes:
    try:
        response = httpx.get(url, timeout=60.0, follow_redirects=False)
        if response.status_code in (401, 403) and os.environ.get("AWS_ACCESS_KEY_ID") \
                and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            from httpx_auth import AWS4Auth

            token = {"security_token": os.environ["AWS_SESSION_TOKEN"]} if os.environ.get("AWS_SESSION_TOKEN") else {}
            auth = AWS4Auth(access_id=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                            service="s3", **token)
            response = httpx.get(url, timeout=60.0, follow_redirects=False, auth=auth)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot fetch {url}: {type(exc).__name__}") from None
    if response.status_code in (401, 403):
        raise CliError(f"{url} answered {response.status_code}: the image went to a URL this machine may not read; "
                       "for the results store set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (a presigned PUT URL "
                       "allows only the upload)")
    if not response.is_success:
        raise CliError(f"{url} answered {response.status_code}")
    return response.content


def _from_results_volume(cluster: Cluster, job: dict[str, Any], location: str) -> bytes:
    local = pathlib.Path(location)
    if local.is_absolute() and local.is_file():
        return local.read_bytes()
    agent = (job.get("metadata", {}).get("labels") or {}).get("stoker.dev/agent") or job["status"].get("agent")
    history = job["status"].get("history") or []
    if not agent and history:
        agent = history[-1].get("agent")
    if not agent:
        raise CliError(f"the image is at {location} on an agent's results volume, but the job does not say which agent")
    try:
        ca = cluster.objects.get("CacheAgent", agent)
    except ApiException as exc:
        if exc.status == 404:
            raise CliError(f"the image was on agent {agent}'s results volume, and that agent is gone (the volume "
                           "lives as long as its pod); configure a results store to keep images") from None
        raise
    st = ca.get("status") or {}
    pod, port = st.get("pod"), st.get("resultsPort")
    if not pod or not port:
        raise CliError(f"agent {agent} does not serve its results folder (agent.results.serve is off); "
                       f"copy {location} from pod {pod or agent} with kubectl cp")
    path = f"/api/v1/namespaces/{cluster.namespace}/pods/{pod}:{port}/proxy/results/{pathlib.PurePosixPath(location).name}"
    try:
        response = cluster.api.call_api(path, "GET", auth_settings=["BearerToken"], _preload_content=False,
                                        _request_timeout=(5, 60))
        return bytes(response[0].data)
    except ApiException as exc:
        if exc.status == 403:
            raise CliError("forbidden: fetching from an agent's results folder needs `get` on pods/proxy in "
                           f"namespace {cluster.namespace}") from None
        raise CliError(f"agent {agent} could not hand over {location}: {exc.status} {exc.reason}; the pod may have "
                       "restarted (its results folder is lost with it) or cleaned it up") from None
