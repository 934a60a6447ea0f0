"""A full disk, made real: the checkpoint directory on a tiny tmpfs that a test fills and frees.

Injected ``ENOSPC`` (test_ps_wal_faults.py) shows one system call failing; a real full disk
fails every write in the directory at once -- the checkpoint, its temporary file, ``wal.head``,
the log -- and keeps failing until space comes back. The tmpfs is mounted in a private mount
namespace (``unshare --mount --propagation private``) that a ``sleep`` process holds open; the
servers run inside it (``nsenter -t HOLDER -m``, ``ServerProcess(wrapper=...)``), the test fills
and frees it from outside with ``nsenter ... dd`` / ``rm`` and reads it through
``/proc/HOLDER/root``. Nothing outside the namespace ever sees the mount; it goes away with the
last process in it. Where namespaces or mounts are not permitted, the tests skip.

1. Registration on a full disk is ``UNAVAILABLE`` and leaves the server unregistered (Stats: no
   variables, version 0; a push is ``FAILED_PRECONDITION`` "before registration"; no checkpoint,
   no ``.*.tmp``) -- also with room for part of what it writes, a page more at each attempt,
   until it fits. Then three pushes are acknowledged, and after SIGKILL the restarted server
   holds version 3 with the same values.
2. ``SaveCheckpoint`` on a full disk, and on a disk with less room than the checkpoint, is
   ``UNAVAILABLE`` and leaves no ``.ckpt-*.tmp``: the space the failed write took is given back
   at once (a 256 KiB push fits into what is left, which it would not beside the half-written
   checkpoint), a later ``SaveCheckpoint`` succeeds, and the directory as it was after the
   failures recovers to the acknowledged version.
3. ``--wal`` pushes on a full disk, or with room for part of the record, are ``UNAVAILABLE``
   with nothing changed (version, values, log size, free space); after space comes back, more
   pushes, SIGKILL and a restart, nothing acknowledged is lost and nothing refused was applied.
4. Leftover temporary files (``.ckpt-000000000003.radps.999.tmp``, ``.wal.head.999.tmp``) are
   deleted when a server starts on the directory, and the server says so in its log.
5. A ``--wal`` restart (which must write a checkpoint) on a full disk exits with status 2 and
   one ``radam-ps serve:`` line on stderr naming the directory and the bytes it needs -- no
   traceback -- and leaves the directory as it found it.
"""

import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import grpc
import numpy as np
import pytest

from ps_helpers import REPO, ServerProcess, rpc_code
from radam_dist.ps import storage
from radam_dist.ps.client import PSClient

SERVER_ENV: dict = {}
CONFIG = {"learning_rate": 0.05}
SMALL = {"a": (8,), "w": (256,)}  # a checkpoint of a few KiB
PAGE = 4096


def initial(shapes, seed=1):
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}


def gradient(shapes, i):
    rng = np.random.default_rng(1000 + i)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}


def serve_args(checkpoint_dir: Path) -> List[str]:
    return ["--mode", "async", "--checkpoint-dir", str(checkpoint_dir), "--wal",
            "--checkpoint-interval", "0"]


def tmp_files(directory: Path, pattern: str = ".*.tmp") -> List[str]:
    return sorted(p.name for p in directory.iterdir() if fnmatch.fnmatch(p.name, pattern))


def durable_files(directory: Path) -> Dict[str, int]:
    """Checkpoints and log segments, name -> size."""
    return {p.name: p.stat().st_size for p in directory.iterdir()
            if storage.CKPT_RE.match(p.name) or storage.WAL_RE.match(p.name)}


def assert_same(values, expected, exact=True):
    assert sorted(values) == sorted(expected)
    for name in expected:
        if exact:
            np.testing.assert_array_equal(values[name], expected[name], err_msg=name)
        else:  # written by this process, replayed by another
            np.testing.assert_allclose(values[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


def recover(directory: Path):
    """(version, values) a server recovering ``directory`` starts with (in this process)."""
    from radam_dist.ps.options import ServeOptions
    from radam_dist.ps.service import ShardService

    service = ShardService(ServeOptions(mode="async", checkpoint_dir=directory, wal=True))
    try:
        return service.store.version, service.store.read(service.store.names)
    finally:
        service.close()


def state_left_by_a_crash(directory: Path, shapes, pushes: int):
    """In this process: register and push ``pushes`` times, then stop without the final
    checkpoint -- what SIGKILL leaves (the registration checkpoint, the log after it)."""
    from radam_dist.ps.server import ParameterServerProcess
    from radam_dist.ps.options import ServeOptions

    process = ParameterServerProcess(ServeOptions(mode="async", checkpoint_dir=directory, wal=True,
                                                  checkpoint_interval=0, wal_mark_interval=0))
    process.start()
    try:
        client = PSClient([f"127.0.0.1:{process.port}"], retry_timeout=0)
        client.register(initial(shapes), CONFIG)
        for i in range(pushes):
            assert client.push(gradient(shapes, i)) == i + 1
        values = client.pull()
        client.close()
    finally:
        process.server.stop(None).wait()
        process.service.close()
        process.service.metrics.close()
    assert storage.list_checkpoints(directory)[-1].name == "ckpt-000000000000.radps"
    return values


# -- the disk ---------------------------------------------------------------------------------
class SmallDisk:
    """A tmpfs of ``size`` at ``mountpoint``, visible only inside a private mount namespace held
    open by a ``sleep`` (the holder). ``wrapper`` runs a command inside it; ``view(path)`` is
    where this process reaches ``path`` as the namespace sees it."""

    def __init__(self, mountpoint: Path, size: str):
        for tool in ("unshare", "nsenter", "mount", "dd"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed: no private mount namespace with a tmpfs")
        self.mountpoint = Path(mountpoint)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs -o size="$1" tmpfs "$0" && echo mounted && exec sleep infinity',
             str(self.mountpoint), size],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = self.holder.stdout.readline().strip()
        if line != "mounted":
            self.holder.wait(10)
            why = self.holder.stderr.read().strip()
            pytest.skip(f"cannot mount a tmpfs in a private mount namespace here "
                        f"(unshare/mount not permitted?): {why or 'exit ' + str(self.holder.returncode)}")
        self.wrapper = ["nsenter", "-t", str(self.holder.pid), "-m", "--"]
        probe = self.run("findmnt", "-n", "-o", "FSTYPE", str(self.mountpoint), check=False)
        if probe.returncode != 0 or probe.stdout.strip() != "tmpfs":
            self.close()
            pytest.skip(f"nsenter into the mount namespace failed: {probe.stderr.strip()}")
        self.filler = self.mountpoint / "filler"

    def view(self, path: Path) -> Path:
        return Path(f"/proc/{self.holder.pid}/root") / Path(path).relative_to("/")

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.wrapper, *argv], capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in the namespace: {result.stderr.strip()}")
        return result

    def available(self) -> int:
        st = os.statvfs(self.view(self.mountpoint))
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Leave ``leave`` bytes free (0: write until ENOSPC)."""
        if leave == 0:
            result = self.run("dd", "if=/dev/zero", f"of={self.filler}", f"bs={PAGE}",
                              "oflag=append", "conv=notrunc", check=False)
            assert "No space left" in result.stderr, result.stderr
        else:
            count = (self.available() - leave) // PAGE
            assert count > 0, (self.available(), leave)
            self.run("dd", "if=/dev/zero", f"of={self.filler}", f"bs={PAGE}", f"count={count}",
                     "oflag=append", "conv=notrunc")
        assert 0 <= self.available() - leave < PAGE, (self.available(), leave)

    def free(self) -> None:
        self.run("rm", "-f", str(self.filler))

    def close(self) -> None:
        if self.holder.poll() is None:
            os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait(10)
        for stream in (self.holder.stdout, self.holder.stderr):
            stream.close()


class Lab:
    """Disks and servers of one test; everything is killed at teardown (the namespaces die with
    their last process, the tmpfs with them)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.disks: List[SmallDisk] = []
        self.servers: List[ServerProcess] = []

    def disk(self, size: str) -> SmallDisk:
        disk = SmallDisk(self.tmp_path / f"mnt{len(self.disks)}", size)
        self.disks.append(disk)
        return disk

    def server(self, args: List[str], name: str, disk: Optional[SmallDisk] = None) -> ServerProcess:
        server = ServerProcess(self.tmp_path, args, SERVER_ENV, name,
                               wrapper=disk.wrapper if disk is not None else None)
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self.servers:
            server.kill()
            if server.proc is not None:
                try:
                    server.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        for disk in self.disks:
            disk.close()


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def settle(directory: Path) -> None:
    """Wait for the server's first ``wal.mark`` (written within --wal-mark-interval, 1 s, of the
    first record), so that it takes no space from the test later."""
    deadline = time.monotonic() + 5
    while not (directory / "wal.mark").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def sigkill(server: ServerProcess) -> None:
    server.kill()
    server.proc.wait(30)


# -- 1. registration ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_registration_on_a_full_disk_is_unavailable_and_leaves_nothing_registered(lab):
    disk = lab.disk("256k")
    ckpt = disk.mountpoint / "ckpt"
    server = lab.server(serve_args(ckpt), "reg", disk)
    inside = disk.view(ckpt)
    client = PSClient([server.target], retry_timeout=0)
    try:
        disk.fill()
        with pytest.raises(grpc.RpcError) as excinfo:
            client.register(initial(SMALL), CONFIG)
        assert rpc_code(excinfo) == "UNAVAILABLE", excinfo.value.details()
        stats = client.stats()[0]
        assert stats["variables"] == [] and stats["version"] == 0 and stats["num_parameters"] == 0
        with pytest.raises(grpc.RpcError) as excinfo:
            client.push(gradient(SMALL, 0))
        assert rpc_code(excinfo) == "FAILED_PRECONDITION"
        assert "before registration" in excinfo.value.details(), excinfo.value.details()
        assert tmp_files(inside) == []
        assert storage.list_checkpoints(inside) == []  # nothing durable claims a registration

        # room for part of what registration writes (the checkpoint, the log's first segment,
        # wal.head), a page more each time: each attempt succeeds or leaves nothing behind
        for pages in range(1, 13):
            disk.free()
            disk.fill(leave=pages * PAGE)
            try:
                client.register(initial(SMALL), CONFIG)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, (pages, err.details())
            assert client.stats()[0]["variables"] == [], pages
            assert tmp_files(inside) == [] and storage.list_checkpoints(inside) == [], (
                pages, sorted(os.listdir(inside)))
        else:
            raise AssertionError(f"registration never fitted: {sorted(os.listdir(inside))}")
        assert pages > 1  # (the checkpoint alone takes more than a page)
        disk.free()
        assert client.register(initial(SMALL), CONFIG) == 0  # idempotent: the same job again
        assert [p.name for p in storage.list_checkpoints(inside)] == ["ckpt-000000000000.radps"]
        assert sorted(v["name"] for v in client.stats()[0]["variables"]) == sorted(SMALL)
        for i in range(3):
            assert client.push(gradient(SMALL, i)) == i + 1
        before = client.pull()
    finally:
        client.close()
    sigkill(server)
    server.restart()
    client = PSClient([server.target], retry_timeout=0)
    try:
        assert client.stats()[0]["version"] == 3
        assert_same(client.pull(), before)
    finally:
        client.close()


# -- 2. SaveCheckpoint ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_save_checkpoint_on_a_full_disk_is_unavailable_and_gives_the_space_back(lab, tmp_path):
    shapes = {"a": (8,), "w": (65536,)}  # a 256 KiB push; a checkpoint of about 770 KiB
    disk = lab.disk("2400k")
    ckpt = disk.mountpoint / "ckpt"
    server = lab.server(serve_args(ckpt), "save", disk)
    inside = disk.view(ckpt)
    client = PSClient([server.target], retry_timeout=0)
    try:
        client.register(initial(shapes), CONFIG)
        assert client.push(gradient(shapes, 0)) == 1  # a 256 KiB log record: it fits
        settle(inside)
        checkpoint_size = storage.list_checkpoints(inside)[0].stat().st_size
        push_size = max(p.stat().st_size for p in inside.iterdir() if storage.WAL_RE.match(p.name))
        assert checkpoint_size > 3 * 256 << 10 and push_size > 256 << 10
        free0 = disk.available()
        assert free0 > checkpoint_size + push_size + 16 * PAGE  # room for both, later

        # a full disk
        disk.fill()
        with pytest.raises(grpc.RpcError) as excinfo:
            client.save_checkpoint()
        assert rpc_code(excinfo) == "UNAVAILABLE", excinfo.value.details()
        assert tmp_files(inside, ".ckpt-*.tmp") == []
        assert [p.name for p in storage.list_checkpoints(inside)] == ["ckpt-000000000000.radps"]
        disk.free()
        assert disk.available() >= free0 - 2 * PAGE

        # room for the push but not for the checkpoint: the failed write must give its space back
        room = 512 << 10
        assert push_size + 8 * PAGE < room < checkpoint_size
        disk.fill(leave=room)
        with pytest.raises(grpc.RpcError) as excinfo:
            client.save_checkpoint()
        assert rpc_code(excinfo) == "UNAVAILABLE", excinfo.value.details()
        assert tmp_files(inside, ".ckpt-*.tmp") == []
        assert disk.available() >= room - 2 * PAGE, (
            f"{room - disk.available()} bytes of the {room} left are gone after the failed "
            f"checkpoint: {sorted((p.name, p.stat().st_size) for p in inside.iterdir())}")
        assert client.push(gradient(shapes, 1)) == 2  # fits in what the failed write gave back
        disk.free()
        assert disk.available() >= free0 - push_size - 4 * PAGE
        crashed_here = tmp_path / "after-the-failures"  # the directory as a crash now would leave it
        shutil.copytree(inside, crashed_here)
        pulled = client.pull()

        [(path, version)] = client.save_checkpoint()
        assert (Path(path).name, version) == ("ckpt-000000000002.radps", 2)
        assert (inside / "ckpt-000000000002.radps").exists()
        assert tmp_files(inside) == []
    finally:
        client.close()
    sigkill(server)
    version, values = recover(crashed_here)  # the failed checkpoints broke nothing in the log
    assert version == 2
    assert_same(values, pulled, exact=False)


# -- 3. pushes --------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_wal_pushes_on_a_full_disk_are_refused_and_nothing_acknowledged_is_lost(lab):
    shapes = {"a": (8,), "w": (2048,)}  # an 8 KiB record: more than a page
    disk = lab.disk("256k")
    ckpt = disk.mountpoint / "ckpt"
    server = lab.server(serve_args(ckpt), "push", disk)
    inside = disk.view(ckpt)
    client = PSClient([server.target], retry_timeout=0)
    try:
        client.register(initial(shapes), CONFIG)
        assert client.push(gradient(shapes, 0)) == 1
        assert client.push(gradient(shapes, 1)) == 2
        before, log_before = client.pull(), durable_files(inside)

        settle(inside)
        for i, leave in ((100, 0), (101, 0), (102, PAGE)):  # full; room for part of a record
            disk.fill(leave=leave)
            with pytest.raises(grpc.RpcError) as excinfo:
                client.push(gradient(shapes, i))
            assert rpc_code(excinfo) == "UNAVAILABLE", excinfo.value.details()
            assert disk.available() >= leave  # what the part written took is given back
            disk.free()
        assert client.stats()[0]["version"] == 2
        assert_same(client.pull(), before)
        assert durable_files(inside) == log_before  # the partial records were cut back
        assert tmp_files(inside) == []

        assert client.push(gradient(shapes, 2)) == 3
        assert client.push(gradient(shapes, 3)) == 4
        after = client.pull()
    finally:
        client.close()
    sigkill(server)
    server.restart()
    client = PSClient([server.target], retry_timeout=0)
    try:
        assert client.stats()[0]["version"] == 4
        assert_same(client.pull(), after)
    finally:
        client.close()


# -- 4. the startup sweep ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_startup_deletes_leftover_temporary_files(lab, tmp_path):
    ckpt = tmp_path / "ckpt"
    values = state_left_by_a_crash(ckpt, SMALL, 2)
    kept = durable_files(ckpt)
    leftovers = [".ckpt-000000000003.radps.999.tmp", ".wal.head.999.tmp"]
    (ckpt / leftovers[0]).write_bytes(storage.CKPT_MAGIC + os.urandom(3 * PAGE))
    (ckpt / leftovers[1]).write_bytes(b'{"seq": 7, "first_ver')
    server = lab.server(serve_args(ckpt), "sweep")
    assert tmp_files(ckpt) == []
    for name in leftovers:
        assert not (ckpt / name).exists()
        log = server.log_path.read_text()
        assert any(name in line for line in log.splitlines()), (name, log[-3000:])
    for name in kept:  # only the temporary files went
        assert (ckpt / name).exists(), (name, sorted(os.listdir(ckpt)))
    client = PSClient([server.target], retry_timeout=0)
    try:
        assert client.stats()[0]["version"] == 2
        assert_same(client.pull(), values, exact=False)
    finally:
        client.close()


# -- 5. a full disk at start ---------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_wal_restart_on_a_full_disk_exits_2_with_one_line(lab, tmp_path):
    shapes = {"a": (8,), "w": (2048,)}  # 8 KiB of parameters, about 25 KiB of checkpoint
    state = tmp_path / "state"
    values = state_left_by_a_crash(state, shapes, 3)  # a restart must write a checkpoint at 3
    disk = lab.disk("256k")
    ckpt = disk.mountpoint / "ckpt"
    inside = disk.view(ckpt)
    shutil.copytree(state, inside)
    files = durable_files(inside)
    checkpoint_size = files["ckpt-000000000000.radps"]
    disk.fill()
    port_file = tmp_path / "full.port"
    result = subprocess.run(
        [*disk.wrapper, sys.executable, "-m", "radam_dist.ps.cli", "serve", "--port", "0",
         "--port-file", str(port_file), *serve_args(ckpt)],
        cwd=REPO, capture_output=True, text=True, timeout=100,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **SERVER_ENV))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("radam-ps serve:")]
    assert len(lines) == 1, result.stderr[-4000:]
    assert str(ckpt) in lines[0], lines[0]
    needs = [int(n.replace(",", "")) for n in re.findall(r"(\d[\d,]*)\s*bytes", lines[0])]
    arrays = 3 * 4 * sum(int(np.prod(s)) for s in shapes.values())  # parameters, m, v
    assert any(arrays <= n <= 4 * checkpoint_size for n in needs), (lines[0], arrays, checkpoint_size)
    assert not port_file.exists()  # it never served

    # the directory is as it was: nothing half-written left, nothing cut or moved aside
    assert tmp_files(inside) == []
    after = durable_files(inside)
    assert {n: after.get(n) for n in files} == files, after
    assert all(after[n] == 0 for n in set(after) - set(files)), after  # at most an empty segment
    assert sorted(p.name for p in inside.iterdir() if p.name.startswith("discarded-")) == []
    disk.free()
    version, recovered = recover(inside)
    assert version == 3
    assert_same(recovered, values, exact=False)
