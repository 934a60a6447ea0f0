"""A sync-mode worker process for tests/test_ps_sync_atomic.py: registers, pushes the
gradient of one round, and -- with --die-at PHASE -- exits abruptly (os._exit) exactly at that
point of the two-phase protocol ("staged:<shard>", "mid-stream:<shard>", "committed",
"applied:<shard>"), as a worker killed there would.

    python tests/ps_sync_worker.py TARGETS WORKER_ID ROUND [--die-at PHASE]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_ps_sync_atomic import CONFIG, SPLIT, gradient, initial  # noqa: E402

from radam_dist.ps.client import PSClient  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("targets")
    parser.add_argument("worker_id")
    parser.add_argument("round", type=int)
    parser.add_argument("--die-at", default="")
    args = parser.parse_args()
    client = PSClient(args.targets.split(","), worker_id=args.worker_id, split_threshold_bytes=SPLIT,
                      retry_timeout=30)
    client.register(initial(), CONFIG)
    client.pull()
    if args.die_at:
        client.stage_sequentially = True

        def hook(phase: str) -> None:
            if phase == args.die_at:
                os._exit(17)

        client._on_phase = hook
    version = client.push(gradient(args.worker_id, args.round))
    print(json.dumps({"version": version}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
