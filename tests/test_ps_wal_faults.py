"""Write-ahead log faults: a damaged last record, a failing disk, restarts before registration,
a taken port.

* A last record whose payload ends in zeros and carries one flipped bit is damage (its trailer
  is intact), never a torn tail: recovery refuses.
* A write or fsync error (ENOSPC, EIO) refuses that push with UNAVAILABLE, truncates the record
  back and the server keeps going; if the truncation fails too, the log is broken: INTERNAL,
  health NOT_SERVING, every later update refused; a restart recovers without any flag.
* A --wal server started and stopped three times before anyone registers starts each time.
* A taken port: exit 2 naming host:port; the same directory can then be served in-process.
"""

import errno
import os
import shutil
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps_helpers import REPO, ServerProcess
from radam_dist.ps import storage
from radam_dist.ps.client import PSClient

SHAPES = {"a": (8,), "z": (64,)}  # "z" packs last: the payload ends with its bytes


def zero_tailed(i):
    """A gradient whose last 256 bytes (all of "z") are zeros but one element."""
    g = {"a": np.full(8, 0.1 * (i + 1), np.float32), "z": np.zeros(64, np.float32)}
    g["z"][0] = 0.01 * (i + 1)
    return g


def recover(directory, wal=True):
    from radam_dist.ps.options import ServeOptions
    from radam_dist.ps.service import ShardService

    service = ShardService(ServeOptions(mode="async", checkpoint_dir=directory, wal=wal))
    try:
        return service.store.version, service.store.read(service.store.names)
    finally:
        service.close()


# -- 1. a flipped bit in a last record that ends in zeros --------------------------------------
@pytest.mark.timeout(300)
def test_flipped_bit_in_zero_tailed_last_record_is_damage_not_torn(tmp_path):
    ckpt = tmp_path / "ckpt"
    server = ServerProcess(tmp_path, ["--mode", "async", "--checkpoint-dir", str(ckpt), "--wal",
                                      "--checkpoint-interval", "0"]).start()
    try:
        client = PSClient([server.target], retry_timeout=0)
        client.register({n: np.ones(s, np.float32) for n, s in SHAPES.items()},
                        {"learning_rate": 0.05})
        for i in range(3):
            client.push(zero_tailed(i))
        client.close()
    finally:
        server.kill()
        server.proc.wait(30)
    pristine = tmp_path / "pristine"  # recovering writes a checkpoint: copy the state first
    shutil.copytree(ckpt, pristine)
    seg = storage.WriteAheadLog(pristine).segments()[-1]
    data = seg.read_bytes()
    records, damage = storage.scan_segment(data, seg, newest=True)
    assert damage is None and len(records) == 3
    start, payload = records[-1]
    assert not payload[-16:].strip(b"\0")  # the case the old heuristic called "torn"
    assert recover(ckpt)[0] == 3
    # one flipped bit in the zeros at the end of the last payload
    where = start + storage.WAL_HEADER + len(payload) - 5
    for target in (where, start + storage.WAL_HEADER + len(payload) // 2):
        directory = tmp_path / f"flip{target}"
        shutil.copytree(pristine, directory)
        path = directory / seg.name
        damaged = bytearray(path.read_bytes())
        damaged[target] ^= 0x01
        path.write_bytes(bytes(damaged))
        _, found = storage.scan_segment(bytes(damaged), path, newest=True)
        assert found is not None and not found.torn and "checksum" in found.reason
        with pytest.raises(storage.RecoveryError) as excinfo:
            recover(directory)
        assert f"{seg.name} at byte {start} " in str(excinfo.value)
        assert path.stat().st_size == len(data)  # nothing was cut off
    # a record whose trailer is missing (cut short) or zeros is a torn tail: dropped
    directory = tmp_path / "torn"
    shutil.copytree(pristine, directory)
    os.truncate(directory / seg.name, len(data) - 3)
    assert recover(directory)[0] == 2
    directory = tmp_path / "zero-trailer"
    shutil.copytree(pristine, directory)
    zeroed = bytearray(data)
    zeroed[-storage.WAL_TRAILER:] = bytes(storage.WAL_TRAILER)
    (directory / seg.name).write_bytes(bytes(zeroed))
    assert recover(directory)[0] == 2
    # a segment of the old (unreleased, trailer-less) format is refused, naming it
    directory = tmp_path / "old"
    shutil.copytree(pristine, directory)
    old = bytearray(data)
    old[:2] = storage.WAL_OLD_MARK
    (directory / seg.name).write_bytes(bytes(old))
    with pytest.raises(storage.RecoveryError, match="unreleased format"):
        recover(directory)


# -- 2. a failing disk ----------------------------------------------------------------------------
def _in_process_server(directory):
    from radam_dist.ps.server import ParameterServerProcess
    from radam_dist.ps.options import ServeOptions

    process = ParameterServerProcess(ServeOptions(mode="async", checkpoint_dir=directory, wal=True,
                                                  checkpoint_interval=0))
    process.start()
    return process


def _health(port):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _code(excinfo):
    err = excinfo.value
    while err is not None and not isinstance(err, grpc.RpcError):
        err = err.__cause__ or err.__context__
    return err.code() if err is not None else None, str(excinfo.value)


@pytest.mark.timeout(300)
def test_wal_write_errors_refuse_the_push_and_fail_stop_when_unrecoverable(tmp_path):
    directory = tmp_path / "ckpt"
    process = _in_process_server(directory)
    wal = process.service.wal
    client = PSClient([f"127.0.0.1:{process.port}"], retry_timeout=0)
    try:
        client.register({n: np.ones(s, np.float32) for n, s in SHAPES.items()}, {"learning_rate": 0.05})
        assert client.push(zero_tailed(0)) == 1
        size = wal.path.stat().st_size

        # ENOSPC on fsync, after the record was written: truncated back, push refused
        def no_space(fd):
            wal._fsync = os.fsync  # once: the fsync after the truncation succeeds
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        wal._fsync = no_space
        with pytest.raises(Exception) as excinfo:
            client.push(zero_tailed(1))
        code, text = _code(excinfo)
        assert code == grpc.StatusCode.UNAVAILABLE and "No space left" in text, text
        assert wal.path.stat().st_size == size and process.service.store.version == 1
        wal._fsync = os.fsync
        assert client.push(zero_tailed(2)) == 2  # the disk is back: the server goes on
        assert _health(process.port) == health_pb2.HealthCheckResponse.SERVING

        # EIO half-way through the write, and the truncation fails too: fail-stop
        def half_then_eio(fd, view):
            os.write(fd, view[:len(view) // 2])
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        def no_truncate(fd, length):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        wal._write, wal._truncate = half_then_eio, no_truncate
        with pytest.raises(Exception) as excinfo:
            client.push(zero_tailed(3))
        code, text = _code(excinfo)
        assert code == grpc.StatusCode.INTERNAL and "broken" in text, text
        assert _health(process.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        wal._write, wal._truncate = os.write, os.ftruncate
        with pytest.raises(Exception) as excinfo:  # even with the disk back: nothing more
            client.push(zero_tailed(4))
        assert _code(excinfo)[0] == grpc.StatusCode.INTERNAL
        assert process.service.store.version == 2
    finally:
        client.close()
        process.stop(grace=1)
    # a restart recovers from the directory, no flag: the half record is a torn tail
    version, values = recover(directory)
    assert version == 2
    assert list(directory.glob("*.torn-*"))
    process = _in_process_server(directory)  # and serves again
    try:
        client = PSClient([f"127.0.0.1:{process.port}"], retry_timeout=0)
        assert client.push(zero_tailed(5)) == 3
        client.close()
    finally:
        process.stop(grace=1)


# -- 3. restarts before registration ------------------------------------------------------------
@pytest.mark.timeout(400)
def test_restarts_before_registration_all_start(tmp_path):
    directory = tmp_path / "ckpt"
    args = ["--mode", "async", "--checkpoint-dir", str(directory), "--wal"]
    for n in range(3):
        server = ServerProcess(tmp_path, args, name=f"s{n}").start()
        server.kill()  # SIGKILL, as a crash-looping pod would be
        server.proc.wait(30)
    server = ServerProcess(tmp_path, args, name="last").start()
    try:
        client = PSClient([server.target], retry_timeout=0)
        client.register({n: np.ones(s, np.float32) for n, s in SHAPES.items()}, {"learning_rate": 0.05})
        assert client.push(zero_tailed(0)) == 1
        client.close()
    finally:
        assert server.terminate() == 0
    assert recover(directory)[0] == 1
    # a head left by the old behaviour (empty segments, one per start) is a fresh start too
    old = tmp_path / "old"
    old.mkdir()
    for seq in range(3):
        (old / f"wal-000000000000-{seq:06d}.log").write_bytes(b"")
    (old / storage.WAL_HEAD).write_text('{"seq": 2, "first_version": 0}')
    assert recover(old)[0] == 0
    # ... but a head written at a checkpoint, with the checkpoint gone, is refused
    gone = tmp_path / "gone"
    shutil.copytree(directory, gone)
    for path in storage.list_checkpoints(gone):
        path.unlink()
    for path in storage.WriteAheadLog(gone).segments():
        path.write_bytes(b"")
    with pytest.raises(storage.RecoveryError, match="no checkpoint"):
        recover(gone)


# -- 4. a taken port -------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_taken_port_is_a_one_line_refusal_and_releases_the_directory(tmp_path):
    directory = tmp_path / "ckpt"
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "radam_dist.ps.cli", "serve", "--port", str(port), "--mode",
             "async", "--checkpoint-dir", str(directory), "--wal"],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"127.0.0.1:{port}" in result.stderr and "refusing to start" in result.stderr
        assert "Traceback" not in result.stderr, result.stderr[-3000:]

        # in one process: the failed attempt releases the lock and the log
        from radam_dist.ps.server import ParameterServerProcess, PortBindError
        from radam_dist.ps.options import ServeOptions

        options = ServeOptions(mode="async", checkpoint_dir=directory, wal=True)
        with pytest.raises(PortBindError, match=f"127.0.0.1:{port}"):
            ParameterServerProcess(options, port=port)
    process = ParameterServerProcess(options, port=0)
    try:
        process.start()
    finally:
        process.stop(grace=1)


# -- 5-7. the checkpointer thread, the decision history, the allocator ----------------------------
@pytest.mark.timeout(300)
def test_stop_joins_the_checkpointer_before_the_final_checkpoint(tmp_path):
    import threading

    from radam_dist.ps.server import ParameterServerProcess
    from radam_dist.ps.options import ServeOptions

    process = ParameterServerProcess(ServeOptions(mode="async", checkpoint_dir=tmp_path / "c",
                                                  wal=True, checkpoint_interval=0.01))
    process.start()
    timer = next(t for t in process._threads if t.name == "checkpointer")
    client = PSClient([f"127.0.0.1:{process.port}"], retry_timeout=0)
    client.register({n: np.ones(s, np.float32) for n, s in SHAPES.items()}, {"learning_rate": 0.05})
    for i in range(5):
        client.push(zero_tailed(i))
    client.close()
    process.stop(grace=1)
    assert timer is not None and not timer.is_alive()
    assert "checkpointer" not in [t.name for t in threading.enumerate()]
    assert recover(tmp_path / "c")[0] == 5


def test_checkpoints_keep_as_many_decisions_as_the_constant_says(tmp_path):
    from radam_dist.ps.options import ServeOptions
    from radam_dist.ps.rounds import DECISIONS_KEPT, Decision
    from radam_dist.ps.service import ShardService

    service = ShardService(ServeOptions(mode="sync", checkpoint_dir=tmp_path / "c"))
    try:
        for r in range(DECISIONS_KEPT + 50):
            service.rounds.record_decision(r, Decision({"w0": f"r{r}"}))
        service.store.export_state = lambda: ({}, {})  # the decisions are what is checked
        with service.shard.cond:
            meta, _ = service.checkpointer.export_locked()
        assert len(meta["decisions"]) == DECISIONS_KEPT
        assert meta["decisions"][0][0] == 50
    finally:
        service.close()


def test_psclient_leaves_the_allocator_alone_unless_asked(monkeypatch):
    from radam_dist.ps import client as client_module

    calls = []
    monkeypatch.setattr(client_module, "reuse_freed_memory", lambda: calls.append(1))
    PSClient(["127.0.0.1:1"], retry_timeout=0).close()
    assert calls == []
    PSClient(["127.0.0.1:1"], retry_timeout=0, tune_allocator=True).close()
    assert calls == [1]


@pytest.mark.timeout(300)
def test_sync_round_whose_log_write_fails_is_abandoned_not_applied(tmp_path):
    from radam_dist.ps.server import ParameterServerProcess
    from radam_dist.ps.options import ServeOptions

    directory = tmp_path / "ckpt"
    process = ParameterServerProcess(ServeOptions(mode="sync", num_workers=1, checkpoint_dir=directory,
                                                  wal=True, checkpoint_interval=0))
    process.start()
    wal = process.service.wal
    client = PSClient([f"127.0.0.1:{process.port}"], retry_timeout=0)
    try:
        client.register({n: np.ones(s, np.float32) for n, s in SHAPES.items()}, {"learning_rate": 0.05})
        calls = []

        def fail_the_round_record(fd):  # the stage record's fsync passes, the round's fails
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)

        wal._fsync = fail_the_round_record
        with pytest.raises(Exception) as excinfo:
            client.push(zero_tailed(0))
        assert "No space left" in str(excinfo.value), str(excinfo.value)
        assert process.service.store.version == 0 and not process.service.rounds.ready_workers()
        wal._fsync = os.fsync
        client.push(zero_tailed(1))
        assert process.service.store.version == 1
    finally:
        client.close()
        process.stop(grace=1)
    assert recover_sync(directory) == 1


def recover_sync(directory):
    from radam_dist.ps.options import ServeOptions
    from radam_dist.ps.service import ShardService

    service = ShardService(ServeOptions(mode="sync", num_workers=1, checkpoint_dir=directory, wal=True))
    try:
        return service.store.version
    finally:
        service.close()
