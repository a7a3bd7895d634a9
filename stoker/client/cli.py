"""The user verbs of the `stoker` command: submit, get image, top, models, cordon, uncordon, drain.

Exit codes: 0 done; 1 the job failed, or the API server refused or could not be reached;
2 bad usage; 124 `--wait` or `drain --timeout` ran out of time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from stoker.api.generationjob import NoiseSchedule, Sampler

Handler = Callable[[Any, argparse.Namespace, Any], int]


def _connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace (default: the current kubeconfig context's)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")


def register(sub: Any) -> None:
    """Add the user verbs to the `stoker` subcommands."""
    from stoker.client import fleet, jobs

    s = sub.add_parser("submit", help="create a GenerationJob; with --wait, follow it and fetch the image")
    _connection_flags(s)
    s.add_argument("--model", required=True, help="ModelCache name of the checkpoint")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative-prompt")
    s.add_argument("--lora", action="append", type=jobs.parse_lora, default=[], metavar="NAME[:WEIGHT]",
                   help="a LoRA ModelCache and its weight (repeat for several)")
    s.add_argument("--vae", help="a VAE ModelCache replacing the checkpoint's own")
    s.add_argument("--steps", type=int)
    s.add_argument("--cfg-scale", type=float)
    s.add_argument("--width", type=int)
    s.add_argument("--height", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--sampler", choices=[v.value for v in Sampler])
    s.add_argument("--scheduler", choices=[v.value for v in NoiseSchedule])
    s.add_argument("--priority", type=int)
    s.add_argument("--timeout", type=int, help="spec.timeoutSeconds: the job fails if not done this long after creation")
    s.add_argument("--ttl", type=int, help="spec.ttlSecondsAfterFinished")
    s.add_argument("--output-url", help="spec.output.url: PUT the image there (e.g. a presigned URL) instead of the "
                                        "agents' results store or folder")
    s.add_argument("--name", help="job name (default: generated from the model name)")
    s.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it finishes")
    s.add_argument("--wait-timeout", type=float, default=3600.0, help="give up waiting after this many seconds")
    s.add_argument("-o", "--output", help="with --wait: write the image to this file")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(client=jobs.submit)

    g = sub.add_parser("get", help="fetch a job's result: stoker get image JOB -o out.png")
    gsub = g.add_subparsers(dest="what", required=True)
    gi = gsub.add_parser("image", help="fetch the image of a Succeeded job")
    _connection_flags(gi)
    gi.add_argument("job")
    gi.add_argument("-o", "--output", help="file to write (default: JOB.png)")
    gi.set_defaults(client=jobs.get_image)

    t = sub.add_parser("top", help="agents (GPU, VRAM, slots, downloads, hot models) and models (copies, demand)")
    _connection_flags(t)
    t.add_argument("-o", "--output", choices=["table", "json"], default="table")
    t.set_defaults(client=fleet.top)

    m = sub.add_parser("models", help="ModelCaches with their copies, targets and demand")
    _connection_flags(m)
    m.add_argument("-o", "--output", choices=["table", "json"], default="table")
    m.set_defaults(client=fleet.models)

    for verb, fn, what in (("cordon", fleet.cordon, "take no new jobs on AGENT; running jobs finish"),
                           ("uncordon", fleet.uncordon, "let AGENT take jobs again"),
                           ("drain", fleet.drain, "cordon AGENT and wait until its jobs have finished")):
        c = sub.add_parser(verb, help=what)
        _connection_flags(c)
        c.add_argument("agent", help="CacheAgent name")
        if verb == "drain":
            c.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (exit 124)")
        c.set_defaults(client=fn)


def run(args: argparse.Namespace) -> int:
    """Connect as kubectl would and run the verb; errors become one line on stderr and an exit code."""
    from kubernetes.client.exceptions import ApiException
    from rich.console import Console

    from stoker.client.context import CliError, connect

    console = Console(stderr=True)
    try:
        cluster = connect(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace)
        return int(args.client(cluster, args, console))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except ApiException as exc:
        print(f"error: the API server answered {exc.status} {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
