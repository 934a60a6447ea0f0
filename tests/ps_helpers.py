"""Real `radam-ps serve` processes on loopback for the parameter-server tests.

Each server runs in its own process group (so a test can SIGKILL it, and teardown never leaves
one behind), binds port 0 and reports the port through --port-file. ``wrapper`` runs the server
under a command that execs it (``nsenter -t PID -m --``: inside another mount namespace), so the
process the test kills is still the server itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent


class ServerProcess:
    def __init__(self, workdir: Path, args: List[str], env: Optional[dict] = None,
                 name: str = "ps", port: int = 0, host: str = "127.0.0.1",
                 wrapper: Optional[List[str]] = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.env = env
        self.wrapper = list(wrapper or [])  # prepended to the argv; it must exec the server
        self.name = name
        self.host = host
        self.port = port
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.workdir / f"{name}.log"

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, wait: bool = True, timeout: float = 90.0) -> "ServerProcess":
        port_file = self.workdir / f"{self.name}.port"
        port_file.unlink(missing_ok=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        env.update(self.env or {})
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "radam_dist.ps.cli", "serve", "--host", self.host,
             "--port", str(self.port), "--port-file", str(port_file), *self.args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if wait:
            deadline = time.monotonic() + timeout
            while not port_file.exists():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n"
                                       + self.log_path.read_text()[-4000:])
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"server {self.name} did not start:\n" + self.log())
                time.sleep(0.05)
            self.port = int(port_file.read_text())
        return self

    def log(self) -> str:
        return self.log_path.read_text()[-6000:] if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (checkpoint and exit) and wait."""
        self.kill(signal.SIGTERM)
        return self.proc.wait(timeout)

    def restart(self, **kwargs) -> "ServerProcess":
        """Start again on the same port (so clients reconnect to the same address)."""
        if self.proc is not None:
            self.kill()
            self.proc.wait(30)
        return self.start(**kwargs)


class ServerPool:
    """Starts servers in parallel and kills every one of them at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = Path(tmp_path)
        self.servers: List[ServerProcess] = []

    def start(self, *arg_lists: List[str], env: Optional[dict] = None,
              envs: Optional[List[dict]] = None, prefix: str = "ps",
              host: str = "127.0.0.1") -> List[ServerProcess]:
        """Start one server per argument list (``envs``: per-server extra environment)."""
        envs = envs or [env] * len(arg_lists)
        created = [ServerProcess(self.tmp_path, args, envs[i], f"{prefix}{i}", host=host)
                   for i, args in enumerate(arg_lists)]
        self.servers.extend(created)
        for s in created:
            s.start(wait=False)
        for s in created:  # wait for all (they import TensorFlow concurrently)
            port_file = s.workdir / f"{s.name}.port"
            deadline = time.monotonic() + 120
            while not port_file.exists():
                if s.proc.poll() is not None:
                    raise RuntimeError(f"server {s.name} exited:\n{s.log()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server {s.name} did not start:\n{s.log()}")
                time.sleep(0.05)
            s.port = int(port_file.read_text())
        return created

    def close(self) -> None:
        for s in self.servers:
            s.kill()
            if s.proc is not None:
                try:
                    s.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass


def rpc_code(excinfo) -> str:
    """The gRPC status code name of a raised grpc.RpcError (or its cause)."""
    err = excinfo.value if hasattr(excinfo, "value") else excinfo
    while err is not None and not hasattr(err, "code"):
        err = err.__cause__
    return err.code().name
