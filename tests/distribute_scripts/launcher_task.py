"""A stand-in task for the launcher's cleanup / restart tests (no TensorFlow: starts fast).

Writes its pid to PID_DIR/<task>-r<restart>.pid and prints its task, restart and cluster.
--spawn-child starts a `sleep` in its process group, --spawn-escaped one in a session of its
own (it leaves the group); their pids go to PID_DIR/<task>-r<restart>-{child,escaped}.pid.
--ignore-term makes it ignore SIGTERM (as TensorFlow effectively does). The --fail-task fails
with --code on the restarts listed in --fail-restarts (after --wait-for pid files exist, and
after writing the time to PID_DIR/failed-at); everyone else sleeps --sleep seconds.
"""

import argparse
import json
import os
import pathlib
import signal
import subprocess
import time

parser = argparse.ArgumentParser()
parser.add_argument("--pid-dir", required=True)
parser.add_argument("--fail-task", default="")
parser.add_argument("--fail-restarts", default="0", help="comma list, or 'all'")
parser.add_argument("--code", type=int, default=7)
parser.add_argument("--sleep", type=float, default=120.0)
parser.add_argument("--wait-for", type=int, default=0)
parser.add_argument("--spawn-child", action="store_true")
parser.add_argument("--spawn-escaped", action="store_true")
parser.add_argument("--ignore-term", action="store_true")
args = parser.parse_args()

task = os.environ["RADAM_DIST_TASK"]
restart = os.environ["RADAM_DIST_RESTART"]
config = json.loads(os.environ["TF_CONFIG"])
pid_dir = pathlib.Path(args.pid_dir)
stem = f"{task.replace(':', '-')}-r{restart}"


def write(name, value):
    tmp = pid_dir / (name + ".tmp")
    tmp.write_text(str(value))
    tmp.rename(pid_dir / name)


if args.spawn_child:
    write(stem + "-child.pid", subprocess.Popen(["sleep", "300"]).pid)
if args.spawn_escaped:
    write(stem + "-escaped.pid", subprocess.Popen(["sleep", "300"], start_new_session=True).pid)
if args.ignore_term:  # after the children were started: they stop on SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
write(stem + ".pid", os.getpid())
print(f"task={task} restart={restart} max={os.environ['RADAM_DIST_MAX_RESTARTS']} "
      f"cluster={json.dumps(config['cluster'], sort_keys=True)}", flush=True)

fails = args.fail_restarts == "all" or restart in args.fail_restarts.split(",")
if task == args.fail_task and fails:
    deadline = time.monotonic() + 30
    while len(list(pid_dir.glob(f"*-r{restart}.pid"))) < args.wait_for:
        if time.monotonic() > deadline:
            raise SystemExit(9)
        time.sleep(0.02)
    write("failed-at", repr(time.time()))
    raise SystemExit(args.code)
time.sleep(args.sleep)
