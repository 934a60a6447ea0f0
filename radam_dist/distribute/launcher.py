"""Start a whole tf.distribute cluster on this machine: one process per task.

Every process runs the same command with its own TF_CONFIG (free loopback ports), its output
lines prefixed with its task (``[worker:1] ...``). The launcher stops every process and exits
non-zero as soon as one fails, and cleans up on Ctrl-C / SIGTERM. Each task runs in its own
process group, so whatever a task started is stopped with it.

MWMS (no parameter servers): the job succeeds when every worker exits 0.
PSS (``ps`` > 0): a chief task (the ClusterCoordinator) is added; workers and parameter
servers serve forever (``serve_if_pss_worker_or_ps``), so the job ends with the chief, and
the servers are stopped then.
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
from typing import Dict, IO, List, Optional, Sequence

from radam_dist.distribute.cluster import local_cluster_spec, tf_config

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130


@dataclass
class Task:
    """One process of the cluster."""

    task_type: str
    index: int
    process: subprocess.Popen
    reader: Optional[threading.Thread] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.index}"


class LocalCluster:
    """Runs ``command`` once per task of a local cluster; see the module docstring."""

    def __init__(
        self,
        command: Sequence[str],
        workers: int,
        ps: int = 0,
        host: str = "127.0.0.1",
        grace_seconds: float = 5.0,
        output: IO[str] = sys.stdout,
        env: Optional[Dict[str, str]] = None,
    ):
        if not command:
            raise ValueError("nothing to launch: give the command after `--`")
        self.command = list(command)
        self.cluster = local_cluster_spec(workers, ps, host)
        self.grace_seconds = grace_seconds
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
        env.setdefault("PYTHONUNBUFFERED", "1")
        process = subprocess.Popen(
            self.command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: Ctrl-C reaches us, we stop them
        )
        task = Task(task_type, index, process)
        task.reader = threading.Thread(target=self._relay, args=(task,), daemon=True)
        task.reader.start()
        return task

    def _relay(self, task: Task) -> None:
        prefix = f"[{task.name}] "
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

    def stop_all(self) -> None:
        """SIGTERM every task's process group; SIGKILL what is left after the grace period."""
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        while time.monotonic() < deadline and any(t.process.poll() is None for t in self.tasks):
            time.sleep(0.05)
        self._signal_all(signal.SIGKILL)
        for task in self.tasks:
            task.process.wait()
            if task.reader is not None:
                task.reader.join(timeout=2.0)

    # -- the job ------------------------------------------------------------------------------
    def run(self) -> int:
        """Start every task and wait for the job; returns the launcher's exit status."""
        # Also for SIGINT: a launcher started in the background inherits SIGINT ignored.
        previous = {sig: signal.signal(sig, _raise_keyboard_interrupt)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for task_type in ("chief", "worker", "ps"):
                for index in range(len(self.cluster.get(task_type, []))):
                    self.tasks.append(self._start(task_type, index))
            log.info("started %s", ", ".join(t.name for t in self.tasks))
            return self._wait()
        except KeyboardInterrupt:
            log.warning("interrupted: stopping every task")
            return EXIT_INTERRUPTED
        finally:
            self.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
                    self._report(f"{task.name} exited with status {code}: stopping every task")
                    return code if code > 0 else 128 - code  # killed by a signal: 128 + sig
                if self.parameter_server_mode and task.task_type == "chief":
                    return 0
            if done:
                return 0
            time.sleep(0.05)

    def _report(self, message: str) -> None:
        with self._write_lock:
            self.output.write(f"[radam-dist] {message}\n")
            self.output.flush()


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def launch(command: Sequence[str], workers: int, ps: int = 0, host: str = "127.0.0.1") -> int:
    """Run ``command`` as a local cluster; returns the exit status for the shell."""
    return LocalCluster(command, workers=workers, ps=ps, host=host).run()
