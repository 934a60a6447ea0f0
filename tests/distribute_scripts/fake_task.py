"""A stand-in task for launcher tests (no TensorFlow: starts in milliseconds).

Writes its pid to PID_DIR/<task>.pid, prints its task and TF_CONFIG, then exits with
--code if it is --fail-task, with 0 if it is --finish-task (both once --wait-for tasks
have written their pid), else sleeps --sleep seconds.
"""

import argparse
import json
import os
import pathlib
import time

parser = argparse.ArgumentParser()
parser.add_argument("--pid-dir", required=True)
parser.add_argument("--fail-task", default="")
parser.add_argument("--finish-task", default="")
parser.add_argument("--code", type=int, default=3)
parser.add_argument("--sleep", type=float, default=60.0)
parser.add_argument("--wait-for", type=int, default=0,
                    help="before finishing, wait until this many tasks wrote their pid")
args = parser.parse_args()

task = os.environ["RADAM_DIST_TASK"]
config = json.loads(os.environ["TF_CONFIG"])
pathlib.Path(args.pid_dir, task.replace(":", "-") + ".pid").write_text(str(os.getpid()))
print(f"task={task} type={config['task']['type']} index={config['task']['index']} "
      f"cluster={json.dumps(config['cluster'], sort_keys=True)}", flush=True)


def wait_for_the_others():
    deadline = time.monotonic() + 30
    while len(list(pathlib.Path(args.pid_dir).glob("*.pid"))) < args.wait_for:
        if time.monotonic() > deadline:
            raise SystemExit(9)
        time.sleep(0.05)


if task == args.fail_task:
    wait_for_the_others()
    raise SystemExit(args.code)
if task == args.finish_task:
    wait_for_the_others()
    raise SystemExit(0)
if args.sleep:
    time.sleep(args.sleep)
