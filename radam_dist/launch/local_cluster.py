"""Start a whole tf.distribute cluster on this machine: one process per task.

Every process runs the same command with its own TF_CONFIG (free ports), its output lines
prefixed with its task (``[worker:1]``, or ``[worker:1 r2]`` in restart 2 when restarts are
allowed).

Cleaning up. Each task runs under a small supervisor (``supervisor.py``) in a process group
of its own. The supervisor is a child subreaper and dies with the launcher (PDEATHSIG), so
whatever a task started -- even a process that left its group -- is stopped with the task,
when the task exits, and when the launcher dies, also by SIGKILL. Stopping a task: SIGTERM to
its process group and its descendants, SIGKILL after a grace period (``grace_seconds``, 2 s,
once a task has failed; ``stop_grace_seconds``, 10 s, when the launcher is interrupted, so
tasks can checkpoint; a second Ctrl-C kills at once).

Restarting. With ``max_restarts`` N, a task that fails stops every task and the whole
cluster starts again (same roles, new ports), at most N times; each task sees the attempt in
``RADAM_DIST_RESTART`` (0 first). Training resumes from what the script saved, e.g. with
``keras.callbacks.BackupAndRestore`` (docs/DISTRIBUTE.md).

MWMS (no parameter servers): an attempt succeeds when every worker exits 0.
PSS (``ps`` > 0): a chief task (the ClusterCoordinator) is added; workers and parameter
servers serve forever (``serve_if_pss_worker_or_ps``), so an attempt ends with the chief, and
the servers are stopped then.

Placement. ``placements`` puts tasks into Linux network namespaces (one per "host", see
``netns``): the task's address in TF_CONFIG is the one given, its port is picked free inside
the namespace, and the supervisor enters the namespace before it starts the task.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, IO, List, Optional, Sequence, Tuple

from radam_dist.launch.cluster import local_cluster_spec, tf_config

# The logger keeps the name it had before the module moved here: log filters and the lines
# `make demo` and `radam-dist launch` print stay the same.
log = logging.getLogger("radam_dist.distribute.launcher")

SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervisor.py")
EXIT_INTERRUPTED = 130  # Ctrl-C; SIGTERM gives 143 (128 + the signal)
KILL_MARGIN_SECONDS = 1.0  # after the grace: the supervisors' own SIGKILL sweep


class _Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass
class Task:
    """One process of the cluster (the supervisor; the command runs below it)."""

    task_type: str
    index: int
    process: subprocess.Popen
    attempt: int = 0
    reader: Optional[threading.Thread] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.index}"


def describe_status(code: int) -> str:
    """``status 7`` / ``killed by SIGKILL`` for a Popen return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"


def exit_status(code: int) -> int:
    """The shell's convention: a task killed by signal S gives 128 + S."""
    return code if code >= 0 else 128 - code


class LocalCluster:
    """Runs ``command`` once per task of a local cluster; see the module docstring."""

    def __init__(
        self,
        command: Sequence[str],
        workers: int,
        ps: int = 0,
        host: str = "127.0.0.1",
        grace_seconds: float = 2.0,
        output: IO[str] = sys.stdout,
        env: Optional[Dict[str, str]] = None,
        *,
        max_restarts: int = 0,
        stop_grace_seconds: float = 10.0,
        placements: Optional[Dict[str, Tuple[str, str]]] = None,
    ):
        if not command:
            raise ValueError("nothing to launch: give the command after `--`")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        if grace_seconds < 0 or stop_grace_seconds < 0:
            raise ValueError("grace periods must be >= 0")
        self.command = list(command)
        self.workers, self.ps, self.host = workers, ps, host
        self.placements = dict(placements or {})
        self.cluster = local_cluster_spec(workers, ps, host, self.placements)
        self.grace_seconds = grace_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self.max_restarts = max_restarts
        self.attempt = 0
        self.output = output
        self.env = dict(os.environ if env is None else env)
        self.tasks: List[Task] = []
        self._write_lock = threading.Lock()

    @property
    def parameter_server_mode(self) -> bool:
        return "ps" in self.cluster

    # -- processes --------------------------------------------------------------------------
    def _start(self, task_type: str, index: int) -> Task:
        env = dict(self.env)
        env["TF_CONFIG"] = tf_config(self.cluster, task_type, index)
        env["RADAM_DIST_TASK"] = f"{task_type}:{index}"
        env["RADAM_DIST_RESTART"] = str(self.attempt)
        env["RADAM_DIST_MAX_RESTARTS"] = str(self.max_restarts)
        env.setdefault("PYTHONUNBUFFERED", "1")
        supervisor = [sys.executable, SUPERVISOR, "--parent", str(os.getpid()),
                      "--grace", str(self.grace_seconds),
                      "--stop-grace", str(self.stop_grace_seconds)]
        placement = self.placements.get(f"{task_type}:{index}")
        if placement is not None:
            supervisor += ["--netns", placement[0]]
        # Popen from the main thread only: PDEATHSIG fires when the *thread* that forked ends.
        process = subprocess.Popen(
            supervisor + ["--"] + self.command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: Ctrl-C reaches us, we stop them
        )
        task = Task(task_type, index, process, self.attempt)
        task.reader = threading.Thread(target=self._relay, args=(task,), daemon=True)
        task.reader.start()
        return task

    def _prefix(self, task: Task) -> str:
        if self.max_restarts:
            return f"[{task.name} r{task.attempt}] "
        return f"[{task.name}] "

    def _relay(self, task: Task) -> None:
        prefix = self._prefix(task)
        for raw in iter(task.process.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._write_lock:
                self.output.write(prefix + line + "\n")
                self.output.flush()
        task.process.stdout.close()

    def _signal_all(self, sig: int) -> None:
        for task in self.tasks:
            if task.process.poll() is None:
                try:
                    os.killpg(task.process.pid, sig)
                except ProcessLookupError:
                    pass

    def _kill_now(self) -> None:
        """Tell each supervisor (not its task) that the grace is over."""
        for task in self.tasks:
            if task.process.poll() is None:
                try:
                    os.kill(task.process.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass

    def _wait_all(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while any(t.process.poll() is None for t in self.tasks):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop_all(self, grace_seconds: Optional[float] = None, reraise: bool = False) -> None:
        """SIGTERM every task's process group; after the grace, the supervisors SIGKILL what
        is left below them (SIGUSR1), and the launcher SIGKILLs the groups a moment later.
        A Ctrl-C meanwhile ends the grace at once (and is raised again with ``reraise``)."""
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        interrupted = None
        self._signal_all(signal.SIGTERM)
        try:
            if not self._wait_all(grace):
                self._kill_now()
                self._wait_all(KILL_MARGIN_SECONDS)
        except _Interrupted as stop:  # Ctrl-C while stopping: no more grace
            interrupted = stop
            self._kill_now()
            self._wait_all(0.2)
        self._signal_all(signal.SIGKILL)
        for task in self.tasks:
            task.process.wait()
            if task.reader is not None:
                task.reader.join(timeout=2.0)
        if interrupted is not None and reraise:
            raise interrupted

    # -- the job ------------------------------------------------------------------------------
    def run(self) -> int:
        """Start every task and wait for the job; returns the launcher's exit status."""
        # Also for SIGINT: a launcher started in the background inherits SIGINT ignored.
        previous = {sig: signal.signal(sig, _raise_interrupted)
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        grace = self.grace_seconds
        try:
            while True:
                self._start_attempt()
                code = self._wait()
                if code == 0:
                    return 0
                if self.attempt >= self.max_restarts:
                    if self.max_restarts:
                        self._report(f"giving up after {self.max_restarts} restart(s)")
                    return code
                self.stop_all(self.grace_seconds, reraise=True)  # Ctrl-C here: no restart
                self.attempt += 1
                self._report(f"restart {self.attempt} of {self.max_restarts}: starting "
                             "every task again")
                self.cluster = local_cluster_spec(self.workers, self.ps, self.host,
                                                  self.placements)
        except _Interrupted as stop:
            grace = self.stop_grace_seconds
            name = signal.Signals(stop.signum).name
            self._report(f"{name}: stopping every task (SIGKILL after {grace:g} s; "
                         "Ctrl-C again to kill now)")
            return 128 + stop.signum
        finally:
            self.stop_all(grace)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start_attempt(self) -> None:
        self.tasks = []
        for task_type in ("chief", "worker", "ps"):
            for index in range(len(self.cluster.get(task_type, []))):
                self.tasks.append(self._start(task_type, index))
        log.info("attempt %d: started %s", self.attempt, ", ".join(t.name for t in self.tasks))

    def _wait(self) -> int:
        while True:
            done = True
            for task in self.tasks:
                code = task.process.poll()
                if code is None:
                    if not (self.parameter_server_mode and task.task_type in ("worker", "ps")):
                        done = False
                    continue
                if code != 0:
                    how = "exited with" if code > 0 else "was"
                    self._report(f"{task.name} {how} {describe_status(code)}: stopping every task")
                    return exit_status(code)
                if self.parameter_server_mode and task.task_type == "chief":
                    return 0
            if done:
                return 0
            time.sleep(0.05)

    def _report(self, message: str) -> None:
        with self._write_lock:
            prefix = f"[radam-dist r{self.attempt}]" if self.max_restarts else "[radam-dist]"
            self.output.write(f"{prefix} {message}\n")
            self.output.flush()


def _raise_interrupted(signum, frame):
    raise _Interrupted(signum)


def launch(command: Sequence[str], workers: int, ps: int = 0, host: str = "127.0.0.1",
           **options) -> int:
    """Run ``command`` as a local cluster; returns the exit status for the shell.

    ``options``: ``max_restarts``, ``grace_seconds``, ``stop_grace_seconds``,
    ``placements`` (see ``LocalCluster``)."""
    return LocalCluster(command, workers=workers, ps=ps, host=host, **options).run()
