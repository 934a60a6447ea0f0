"""Several "hosts" on one machine: Linux network namespaces joined by a switch.

``Fabric(n)`` makes n host namespaces and one switch namespace holding a bridge. Host i has
``eth0`` with 10.231.0.(i+1)/24 (and ``lo`` up); the other end of its veth pair is port
``p<i>`` of the bridge. Both ends of every link can be shaped with ``tc ... tbf`` (egress on
each end, so both directions are limited), and any link can be taken down and up again.

Everything lives inside namespaces this module creates (both veth ends are created directly
in them; nothing is added to the machine's own network namespace), so no traffic can leave
them. ``close()`` deletes the namespaces, which deletes their links; it runs in a ``finally``
or a fixture teardown even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import List, Optional, Sequence

SUBNET = "10.231.0"
REPO = Path(__file__).resolve().parent.parent
PREFIX = "radamtest-"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _tc(namespace: str, *args: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", namespace, "tc", *args],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} in {namespace}: {proc.stderr.strip()}")


def _listen(address: str):
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(16)
    return sock


def in_namespace(name: str, fn):
    """``fn()`` in a thread that entered namespace ``name`` (sockets it makes live there)."""
    import threading

    from radam_dist.launch import netns

    result = {}

    def run():
        try:
            netns.enter(name)
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def remove_stale_namespaces() -> None:
    """Delete namespaces a killed test run left behind (``radamtest-<pid>-...`` whose pid is
    gone): a SIGKILLed pytest never reaches its teardown."""
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name, check=False)


def unavailable_reason() -> Optional[str]:
    """None when namespaces, veth pairs and tbf work here; else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    try:
        with Fabric(1, rate="100mbit"):
            pass
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        return f"cannot build network namespaces here: {err}"
    return None


def tbf_arguments(rate: str) -> List[str]:
    """tbf with a bucket of ~4 ms at ``rate`` (at least 64 KiB) and a 100 ms queue."""
    bits = _parse_rate(rate)
    burst = max(64 << 10, int(bits / 8 * 0.004))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]


def _parse_rate(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for suffix, factor in units.items():
        if rate.lower().endswith(suffix):
            return float(rate[: -len(suffix)]) * factor
    raise ValueError(f"rate {rate!r}: use e.g. 100mbit or 1gbit")


class Fabric:
    def __init__(self, hosts: int, rate: Optional[str] = None, prefix: Optional[str] = None):
        self.n = hosts
        self.rate = rate
        self.prefix = prefix or f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [f"{self.prefix}-h{i}" for i in range(hosts)]
        self._created: List[str] = []
        self._processes: List[subprocess.Popen] = []

    # -- building ------------------------------------------------------------------------------
    def __enter__(self) -> "Fabric":
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> None:
        remove_stale_namespaces()
        for name in [self.switch] + self.hosts:
            _ip("netns", "add", name)
            self._created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            _ip("link", "add", "eth0", "netns", host, "type", "veth",
                "peer", "name", f"p{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
            _ip("-n", host, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "up")
        if self.rate:
            self.shape(self.rate)
        self.wait_reachable()

    def shape(self, rate: str) -> None:
        """Limit every link to ``rate`` in both directions (tbf on both veth ends)."""
        for i, host in enumerate(self.hosts):
            _tc(host, "qdisc", "replace", "dev", "eth0", "root", *tbf_arguments(rate))
            _tc(self.switch, "qdisc", "replace", "dev", f"p{i}", "root", *tbf_arguments(rate))
        self.rate = rate

    def wait_reachable(self, timeout: float = 10.0) -> None:
        """Every host opens a TCP connection to host 0 (the bridge forwards once its ports are
        up). No ping here: the probe runs in threads that enter the namespaces."""
        import socket

        listener = in_namespace(self.hosts[0], lambda: _listen(self.address(0)))
        port = listener.getsockname()[1]
        try:
            for i in range(1, self.n):
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        in_namespace(self.hosts[i], lambda: socket.create_connection(
                            (self.address(0), port), timeout=1.0).close())
                        break
                    except OSError as err:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{self.hosts[i]} cannot reach "
                                               f"{self.address(0)}: {err}") from err
                        time.sleep(0.1)
        finally:
            listener.close()

    # -- using ---------------------------------------------------------------------------------
    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def argv(self, i: int, argv: Sequence[str]) -> List[str]:
        """``argv`` run inside host i."""
        return ["ip", "netns", "exec", self.hosts[i], *argv]

    def popen(self, i: int, argv: Sequence[str], log: Path, env: Optional[dict] = None
              ) -> subprocess.Popen:
        """Start ``argv`` in host i (own process group, output to ``log``, run in the
        repository root); killed by close()."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.argv(i, argv), env=env, stdout=out, cwd=REPO,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._processes.append(proc)
        return proc

    def set_link(self, i: int, up: bool) -> None:
        """Take host i's link down (its switch port: the host sees no carrier) or up again."""
        _ip("-n", self.switch, "link", "set", f"p{i}", "up" if up else "down")

    def close(self) -> None:
        for proc in self._processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self._created):
            _ip("netns", "del", name, check=False)
        self._created = []
