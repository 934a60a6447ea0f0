"""``radam-dist``: command-line tools for radam_dist.

    radam-dist launch --workers 2 -- python train.py --epochs 3
    radam-dist launch --workers 2 --ps 2 -- python train.py
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _launch(args: argparse.Namespace) -> int:
    from radam_dist.distribute.launcher import launch

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("radam-dist launch: give the command to run after `--`")
    return launch(command, workers=args.workers, ps=args.ps, host=args.host)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radam-dist",
        description="Tools for training with radam_dist's RectifiedAdam / Lookahead.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    launch = sub.add_parser(
        "launch",
        help="run a training script as a local tf.distribute cluster",
        description=(
            "Start one process per task of a local cluster on free loopback ports, each "
            "with its TF_CONFIG set, and prefix every output line with its task. Without "
            "--ps the cluster is for MultiWorkerMirroredStrategy (N workers); with --ps M "
            "it is for ParameterServerStrategy (a chief, N workers, M parameter servers; "
            "the script calls radam_dist.distribute.serve_if_pss_worker_or_ps() first). "
            "Stops every process and exits non-zero as soon as one fails; Ctrl-C stops all."
        ),
    )
    launch.add_argument("--workers", type=int, required=True, metavar="N", help="number of workers")
    launch.add_argument("--ps", type=int, default=0, metavar="M",
                        help="number of parameter servers (0: MWMS cluster, the default)")
    launch.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s)")
    launch.add_argument("command", nargs=argparse.REMAINDER, help="the command, after `--`")
    launch.set_defaults(func=_launch)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[radam-dist] %(levelname)s %(message)s",
    )
    if getattr(args, "workers", 1) < 1:
        parser.error("--workers must be at least 1")
    if getattr(args, "ps", 0) < 0:
        parser.error("--ps must be >= 0")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
