"""``radam-dist``: command-line tools for radam_dist.

    radam-dist launch --workers 2 -- python train.py --epochs 3
    radam-dist launch --workers 2 --ps 2 -- python train.py
    radam-dist launch --workers 2 --max-restarts 2 -- python train.py
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _placements(parser: argparse.ArgumentParser, values: List[str]) -> dict:
    """``--netns worker:1=host1@10.231.0.2`` -> {"worker:1": ("host1", "10.231.0.2")}."""
    placements = {}
    for value in values or []:
        task, sep, rest = value.partition("=")
        namespace, at, address = rest.partition("@")
        if not (sep and at and task and namespace and address):
            parser.error(f"--netns {value!r}: expected TASK=NAMESPACE@ADDRESS, "
                         "e.g. worker:1=host1@10.231.0.2")
        if task in placements:
            parser.error(f"--netns: task {task} placed twice")
        placements[task] = (namespace, address)
    return placements


def _launch(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise SystemExit("radam-dist launch: give the command to run after `--`")
    if args.max_restarts < 0:
        args.parser.error("--max-restarts must be >= 0")
    if args.grace < 0 or args.stop_grace < 0:
        args.parser.error("--grace and --stop-grace must be >= 0")
    if args.peer_timeout is not None and not args.peer_timeout >= 0:
        args.parser.error("--peer-timeout must be >= 0 seconds (0: wait forever)")
    placements = _placements(args.parser, args.netns)
    import os

    from radam_dist.launch.local_cluster import LocalCluster

    env = dict(os.environ)
    if args.peer_timeout is not None:
        env["RADAM_DIST_PEER_TIMEOUT"] = f"{args.peer_timeout:g}"
    try:
        cluster = LocalCluster(command, workers=args.workers, ps=args.ps, host=args.host,
                               grace_seconds=args.grace, stop_grace_seconds=args.stop_grace,
                               max_restarts=args.max_restarts, placements=placements, env=env)
    except (ValueError, OSError) as err:
        args.parser.error(str(err))
    return cluster.run()


_LAUNCH_EPILOG = """\
examples:
  radam-dist launch --workers 2 -- python train.py --epochs 3         MWMS, 2 workers
  radam-dist launch --workers 2 --ps 2 -- python train.py             PSS: chief + 2 + 2
  radam-dist launch --workers 2 --max-restarts 3 -- python train.py   survive 3 failures
  radam-dist launch --workers 2 --netns worker:0=h0@10.231.0.1 \\
                    --netns worker:1=h1@10.231.0.2 -- python train.py  one netns per worker

exit status:
  0        every worker (MWMS) or the chief (PSS) exited 0
  N        the status of the task that failed (128+S when signal S killed it), once
           --max-restarts restarts are used up
  130/143  the launcher was stopped by Ctrl-C (SIGINT) / SIGTERM (128 + the signal)
  2        bad arguments

environment of every task:
  TF_CONFIG                 the cluster and this task's role (what tf.distribute reads)
  RADAM_DIST_TASK           this task, e.g. worker:1
  RADAM_DIST_RESTART        0 on the first attempt, k on restart k
  RADAM_DIST_MAX_RESTARTS   the --max-restarts value
  RADAM_DIST_PEER_TIMEOUT   the --peer-timeout value, when given (else inherited; unset: 600)

Every task runs in its own process group under a supervisor: what a task starts is stopped
with it, and everything stops when the launcher dies, even by SIGKILL. On a restart the ports
change; resume from a checkpoint (keras.callbacks.BackupAndRestore, see docs/DISTRIBUTE.md).
"""


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_LAUNCH_EPILOG,
        description=(
            "Start one process per task of a local cluster on free ports, each with its\n"
            "TF_CONFIG set, and prefix every output line with its task ([worker:1], or\n"
            "[worker:1 r2] in restart 2 when --max-restarts is given). Without --ps the\n"
            "cluster is for MultiWorkerMirroredStrategy (N workers); with --ps M it is for\n"
            "ParameterServerStrategy (a chief, N workers, M parameter servers; the script\n"
            "calls radam_dist.distribute.serve_if_pss_worker_or_ps() first). When a task\n"
            "fails, every task is stopped (SIGTERM, SIGKILL after --grace) and the cluster is\n"
            "started again up to --max-restarts times; then the launcher exits non-zero."
        ),
    )
    launch.add_argument("--workers", type=int, required=True, metavar="N", help="number of workers")
    launch.add_argument("--ps", type=int, default=0, metavar="M",
                        help="number of parameter servers (0: MWMS cluster, the default)")
    launch.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s)")
    launch.add_argument("--max-restarts", type=int, default=0, metavar="N",
                        help="when a task fails, restart the whole cluster up to N times "
                             "(default: %(default)s)")
    launch.add_argument("--grace", type=float, default=2.0, metavar="SECONDS",
                        help="after a task failed: SIGTERM, then SIGKILL after this long "
                             "(default: %(default)s)")
    launch.add_argument("--stop-grace", type=float, default=10.0, metavar="SECONDS",
                        help="after Ctrl-C / SIGTERM to the launcher: time the tasks get to "
                             "checkpoint before SIGKILL; Ctrl-C again kills at once "
                             "(default: %(default)s)")
    launch.add_argument("--peer-timeout", type=float, default=None, metavar="SECONDS",
                        help="how long strategy_from_environment() / wait_for_peers() in each "
                             "task waits for the other tasks before it fails "
                             "(RADAM_DIST_PEER_TIMEOUT; default 600; 0: forever)")
    launch.add_argument("--netns", action="append", metavar="TASK=NAMESPACE@ADDRESS",
                        help="run TASK (e.g. worker:1) inside network namespace NAMESPACE "
                             "(`ip netns add`), reachable at ADDRESS; repeat per task (root)")
    launch.add_argument("command", nargs=argparse.REMAINDER, help="the command, after `--`")
    launch.set_defaults(func=_launch, parser=launch)
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
