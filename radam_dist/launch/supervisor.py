"""The tiny parent of every task ``radam-dist launch`` starts; stdlib only, run by file path.

    python supervisor.py --parent PID --grace S --stop-grace S [--netns NAME] -- COMMAND...

Why a process between the launcher and the task: ``PR_SET_PDEATHSIG`` only reaches a direct
child, and a task's own children (data loaders, a shell's pipeline, a server it forked) are
orphaned to PID 1 when the task dies. The supervisor

* asks the kernel for SIGTERM when the launcher dies (even by SIGKILL), and checks the
  launcher did not die before it asked;
* is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever the task started and left
  behind is re-parented to the supervisor, not to PID 1, even if it left the process group;
* starts the task with ``PR_SET_PDEATHSIG=SIGKILL`` (the task dies if the supervisor does);
* when the task exits, sends SIGTERM to whatever it left behind, SIGKILL after ``--grace``
  seconds; on SIGTERM / SIGINT / SIGHUP (the launcher stops the job, or died) does the same to
  the task and every descendant with ``--stop-grace``; then exits with the task's status
  (re-raising the signal that killed it, so the launcher sees the same status).
  SIGUSR1 (the launcher's own grace ran out) cuts the grace short.
"""

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_stop_requested = []
_kill_now = []  # SIGUSR1 from the launcher: its grace is over, SIGKILL now


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def _task_preexec() -> None:  # runs in the forked child; this process has one thread
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _descendants(root: int) -> list:
    """Every live process below ``root`` (from /proc; orphans are re-parented to us)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def _signal_everything(sig: int) -> int:
    pids = _descendants(os.getpid())
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(pids)


def _reap() -> dict:
    statuses = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return statuses
        if pid == 0:
            return statuses
        statuses[pid] = status


def _on_signal(signum, frame):
    _stop_requested.append(signum)


def _on_kill_now(signum, frame):
    _kill_now.append(signum)


def _exit_like(status: int) -> None:
    sys.stdout.flush()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(1.0)  # a stop signal or an ignored one: fall through to an exit code
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main(argv: list) -> None:
    if "--" not in argv:
        sys.exit("usage: supervisor.py --parent PID --grace S --stop-grace S [--netns NAME] "
                 "-- COMMAND...")
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
    opts = dict(zip(options[::2], options[1::2]))
    parent = int(opts["--parent"])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGUSR1, _on_kill_now)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before we asked to be told
        sys.exit(143)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if opts.get("--netns"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import netns  # noqa: E402 - stdlib-only sibling module, imported by path

        netns.enter(opts["--netns"])
    try:
        task = subprocess.Popen(command, preexec_fn=_task_preexec, close_fds=True)
    except OSError as err:
        print(f"[radam-dist] cannot start {command[0]!r}: {err}", file=sys.stderr, flush=True)
        os._exit(127)

    task_status = None
    while task_status is None and not _stop_requested and not _kill_now:
        task_status = _reap().get(task.pid)
        if task_status is None:
            time.sleep(0.02)
    # The task is gone or we were told to stop: stop every process below us, then leave.
    grace = float(opts["--grace"] if task_status is not None else opts["--stop-grace"])
    _signal_everything(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not _kill_now:
        statuses = _reap()
        if task.pid in statuses:
            task_status = statuses[task.pid]
        if not _descendants(os.getpid()):
            break
        time.sleep(0.05)
    while _signal_everything(signal.SIGKILL):
        statuses = _reap()
        if task.pid in statuses:
            task_status = statuses[task.pid]
        time.sleep(0.01)
    statuses = _reap()
    task_status = statuses.get(task.pid, task_status)
    if task_status is None:  # stopped before the task reported (it was killed above)
        _exit_like(signal.SIGTERM)  # WIFSIGNALED(15): status 15
    _exit_like(task_status)


if __name__ == "__main__":
    main(sys.argv[1:])
