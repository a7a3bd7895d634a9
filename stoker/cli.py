"""The `stoker` command: submit jobs and fetch images, look at the fleet (stoker.client), and the
project's tools: generate CRDs, run the local demo, run the fleet simulator."""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Sequence

from stoker import __version__


def cmd_crds(args: argparse.Namespace) -> int:
    """Write the CRD YAML generated from stoker.api into each output folder, and the same CRDs
    as Helm templates into the chart."""
    from stoker import crdgen

    outputs = [(pathlib.Path(out), crdgen.render_crds()) for out in args.out]
    if args.chart_templates:
        outputs.append((pathlib.Path(args.chart_templates), crdgen.render_chart_crds()))
    stale = []
    for folder, files in outputs:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = folder / name
            current = path.read_text() if path.exists() else None
            if current != text:
                stale.append(str(path))
                if not args.check:
                    path.write_text(text)
    if args.check and stale:
        print("CRD YAML is out of date with stoker/api; run `stoker crds`:\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from stoker import demo

    return demo.main(args)


def cmd_sim(args: argparse.Namespace) -> int:
    from stoker.sim import cli as sim_cli

    return int(sim_cli.main(args.sim_args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stoker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stoker {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="generate the CRD YAML from the API types")
    crds.add_argument("--out", nargs="+", default=["crds"], help="output folders of the plain CRD YAML")
    crds.add_argument("--chart-templates", default="charts/stoker/templates/crds",
                      help="folder of the chart's CRD templates ('' to skip)")
    crds.add_argument("--check", action="store_true", help="fail if the files differ instead of writing them")
    crds.set_defaults(func=cmd_crds)

    demo = sub.add_parser("demo", help="run the main job locally: control plane, operator, agents, a small model, real images")
    demo.add_argument("--agents", type=int, default=2, help="agent processes to start")
    demo.add_argument("--jobs", type=int, default=4, help="GenerationJobs to submit")
    demo.add_argument("--out", default="out/demo", help="folder for the PNGs and logs")
    demo.add_argument("--keep", action="store_true", help="keep the control plane running until Ctrl-C")
    demo.set_defaults(func=cmd_demo)

    from stoker.client import cli as client_cli

    client_cli.register(sub)

    sim = sub.add_parser("sim", help="fleet simulator comparing placement policies", add_help=False)
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)
    sim.set_defaults(func=cmd_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        # The simulator owns its flags; argparse.REMAINDER would let the top-level parser claim them.
        return cmd_sim(argparse.Namespace(sim_args=argv[1:]))
    args = build_parser().parse_args(argv)
    if getattr(args, "client", None) is not None:
        from stoker.client import cli as client_cli

        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
        return client_cli.run(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
