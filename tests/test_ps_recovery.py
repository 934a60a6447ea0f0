"""Recovery never turns damage into silent loss.

A real server trains with --wal and is SIGKILLed; then bytes of its WAL segments and
checkpoints are flipped, cut and deleted, and recovery must either restore every update the
files still vouch for or refuse to start, naming the file and the offset. Only a torn tail of
the newest segment (what a crash leaves) may be dropped. The sweeps run the server's own
recovery (``ShardService``) in this process on copies of the directory; the refusals, the
``--discard-damaged-state`` flag and the directory lock are checked with real ``radam-ps serve``
processes.
"""

import contextlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ps_helpers import REPO, ServerProcess
from radam_dist.ps import storage
from radam_dist.ps.client import PSClient

SHAPES = {"w": (6, 4), "b": (4,)}
FIRST, SECOND = 6, 6  # pushes before / after the second checkpoint


def initial():
    rng = np.random.default_rng(1)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def gradient(i):
    rng = np.random.default_rng(100 + i)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def _serve_args(directory, *extra):
    return ["--mode", "async", "--checkpoint-dir", str(directory), "--wal", *extra]


@contextlib.contextmanager
def serving(workdir, directory, *extra, name="ps"):
    """A real `radam-ps serve --wal` on ``directory`` that must start; SIGKILLed and reaped on
    exit (the kernel then releases its directory lock)."""
    server = ServerProcess(workdir, _serve_args(directory, *extra), name=name)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        if server.proc is not None:
            server.proc.wait(30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint dir after 12 acknowledged pushes and kill -9: ckpt-0 + segment 1 (6
    records), ckpt-6 + segment 2 (6 records)."""
    base = tmp_path_factory.mktemp("trained")
    ckpt = base / "ckpt"
    with serving(base, ckpt, "--checkpoint-interval", "0") as server:
        client = PSClient([server.target], retry_timeout=0)
        client.register(initial(), {"learning_rate": 0.05})
        for i in range(FIRST):
            client.push(gradient(i))
        client.save_checkpoint()
        for i in range(FIRST, FIRST + SECOND):
            assert client.push(gradient(i)) == i + 1
        values = client.pull()
        client.close()
    assert [p.name for p in storage.list_checkpoints(ckpt)] == [
        "ckpt-000000000000.radps", "ckpt-000000000006.radps"]
    assert [p.name for p in storage.WriteAheadLog(ckpt).segments()] == [
        "wal-000000000000-000001.log", "wal-000000000006-000002.log"]
    return ckpt, values


def copy(trained, tmp_path, name="c"):
    target = tmp_path / name
    shutil.copytree(trained[0], target)
    return target


def recover(directory, wal=True, discard=False):
    """Run the server's recovery; (version, values) or RecoveryError."""
    from radam_dist.ps.options import ServeOptions
    from radam_dist.ps.service import ShardService

    service = ShardService(ServeOptions(mode="async", checkpoint_dir=directory, wal=wal,
                                        discard_damaged_state=discard))
    try:
        return service.store.version, service.store.read(service.store.names)
    finally:
        service.close()


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def segment(directory, seq):
    return next(p for p in storage.WriteAheadLog(directory).segments()
                if storage.WriteAheadLog.seq_of(p) == seq)


def record_offsets(path):
    records, damage = storage.scan_segment(path.read_bytes(), path, newest=True)
    assert damage is None
    return [(offset, storage.WAL_HEADER + len(payload) + storage.WAL_TRAILER) for offset, payload in records]


def assert_values(values, expected):
    for name in SHAPES:
        np.testing.assert_array_equal(values[name], expected[name])


def test_clean_recovery_restores_every_acknowledged_push(trained, tmp_path):
    version, values = recover(copy(trained, tmp_path))
    assert version == FIRST + SECOND
    assert_values(values, trained[1])


def test_a_flipped_byte_anywhere_in_the_newest_segment_refuses(trained, tmp_path):
    """Header, checksum fields, payload start/middle/end of every record, the last included:
    each is refused with the file and the offset of the damaged record, never dropped."""
    offsets = record_offsets(segment(trained[0], 2))
    assert len(offsets) == SECOND
    tried = 0
    for start, length in offsets:
        for where in sorted({0, 6, 10, length // 2, length - 1}):
            directory = copy(trained, tmp_path, f"f{start}-{where}")
            flip(segment(directory, 2), start + where)
            with pytest.raises(storage.RecoveryError) as excinfo:
                recover(directory)
            message = str(excinfo.value)
            assert "wal-000000000006-000002.log" in message and f"at byte {start} " in message, message
            assert "--discard-damaged-state" in message
            shutil.rmtree(directory)
            tried += 1
    assert tried >= 6 * 5


def test_only_a_torn_tail_is_dropped(trained, tmp_path):
    """A cut inside the newest segment's last record is a crash's torn write: the records
    before it survive, the torn bytes are kept beside the log. A cut inside an earlier record
    leaves nothing after it, so it too looks like a tail and the records before it survive
    (a cut exactly at a record boundary cannot be told from fewer pushes; see docs/PS.md). A
    cut in an older segment, which no crash can cause, refuses."""
    offsets = record_offsets(segment(trained[0], 2))
    for k, (start, length) in enumerate(offsets):
        last = k == len(offsets) - 1
        cuts = (start + 1, start + 13, start + length // 2, start + length - 1) if last else (
            start + 1 + k, start + length - 1 - k)
        for cut in cuts:
            directory = copy(trained, tmp_path, f"cut{cut}")
            path = segment(directory, 2)
            os.truncate(path, cut)
            version, _ = recover(directory)
            assert version == FIRST + k, (cut, version)
            assert list(directory.glob("wal-000000000006-000002.log.torn-*"))
            shutil.rmtree(directory)
    # zeros where the last record should be (space allocated, data never written)
    directory = copy(trained, tmp_path, "zeros")
    path = segment(directory, 2)
    start, length = offsets[-1]
    data = bytearray(path.read_bytes())
    data[start:] = bytes(length)
    path.write_bytes(bytes(data))
    assert recover(directory)[0] == FIRST + SECOND - 1
    # an older segment cut short: needed once the newer checkpoint does not verify
    directory = copy(trained, tmp_path, "older")
    flip(directory / "ckpt-000000000006.radps", 100)
    start, length = record_offsets(segment(directory, 1))[2]
    os.truncate(segment(directory, 1), start + length // 2)
    with pytest.raises(storage.RecoveryError, match=r"wal-000000000000-000001.log at byte"):
        recover(directory)


@pytest.mark.parametrize("where", [0, 20, 200, -40, -1, "cut-half", "cut-10"])
def test_a_damaged_newest_checkpoint_falls_back_losslessly_with_the_wal(trained, tmp_path, where):
    directory = copy(trained, tmp_path)
    path = directory / "ckpt-000000000006.radps"
    if where == "cut-half":
        os.truncate(path, path.stat().st_size // 2)
    elif where == "cut-10":
        os.truncate(path, 10)
    else:
        flip(path, where % path.stat().st_size)
    version, values = recover(directory)
    assert version == FIRST + SECOND  # ckpt-0 + segment 1 + segment 2
    assert_values(values, trained[1])


def test_checkpoints_none_of_which_verifies_refuse(trained, tmp_path):
    directory = copy(trained, tmp_path)
    for path in storage.list_checkpoints(directory):
        flip(path, 50)
    with pytest.raises(storage.RecoveryError, match="none of the 2 checkpoint"):
        recover(directory)
    # without the log, falling back to an older checkpoint would lose updates
    directory = copy(trained, tmp_path, "nowal")
    flip(directory / "ckpt-000000000006.radps", 50)
    with pytest.raises(storage.RecoveryError, match="would lose the updates after it"):
        recover(directory, wal=False)


def test_restart_without_wal_over_a_log_refuses(trained, tmp_path):
    directory = copy(trained, tmp_path)
    with pytest.raises(storage.RecoveryError, match="restart with --wal"):
        recover(directory, wal=False)
    assert recover(directory)[0] == FIRST + SECOND  # nothing was touched


def test_missing_segments_are_noticed(trained, tmp_path):
    # the newest segment, named by the newest checkpoint
    directory = copy(trained, tmp_path, "newest")
    segment(directory, 2).unlink()
    with pytest.raises(storage.RecoveryError, match="segment 2"):
        recover(directory)
    # ... and with its checkpoint deleted too, wal.head still names it
    directory = copy(trained, tmp_path, "newest-and-ckpt")
    segment(directory, 2).unlink()
    (directory / "ckpt-000000000006.radps").unlink()
    with pytest.raises(storage.RecoveryError, match="segment 2 .*missing"):
        recover(directory)
    # a gap in the middle: the older checkpoint needs segment 1
    directory = copy(trained, tmp_path, "gap")
    (directory / "ckpt-000000000006.radps").unlink()
    segment(directory, 1).unlink()
    with pytest.raises(storage.RecoveryError, match="segment 1 that continues the checkpoint"):
        recover(directory)
    # a hole between two present segments
    directory = copy(trained, tmp_path, "hole")
    flip(directory / "ckpt-000000000006.radps", 50)
    segment(directory, 2).rename(directory / "wal-000000000006-000003.log")
    with pytest.raises(storage.RecoveryError, match=r"segments \[2\] are missing"):
        recover(directory)
    # every checkpoint deleted, the log is there
    directory = copy(trained, tmp_path, "nockpt")
    for path in storage.list_checkpoints(directory):
        path.unlink()
    with pytest.raises(storage.RecoveryError, match="no checkpoint"):
        recover(directory)


def test_discard_flag_moves_damage_aside_and_keeps_what_is_intact(trained, tmp_path):
    directory = copy(trained, tmp_path)
    start, length = record_offsets(segment(directory, 2))[3]
    flip(segment(directory, 2), start + length // 2)
    version, _ = recover(directory, discard=True)
    assert version == FIRST + 3  # the three records before the damaged one
    assert list(directory.glob("wal-000000000006-000002.log.torn-*"))  # the rest is kept aside
    assert recover(directory)[0] == FIRST + 3  # and the directory is consistent again


def _serve(directory, *extra, timeout=120):
    """`radam-ps serve` on ``directory`` that is expected to refuse: (CompletedProcess, port file)."""
    port_file = directory.parent / f"{directory.name}.port"
    return subprocess.run(
        [sys.executable, "-m", "radam_dist.ps.cli", "serve", "--port", "0", "--port-file",
         str(port_file), *_serve_args(directory, *extra)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")), port_file


@pytest.mark.timeout(300)
def test_real_server_refuses_damaged_state_then_discards_on_request(trained, tmp_path):
    directory = copy(trained, tmp_path)
    flip(segment(directory, 2), 20)  # inside the first record of the newest segment
    result, port_file = _serve(directory)
    assert result.returncode == 2, result.stderr[-3000:]
    assert not port_file.exists()  # never bound, never SERVING
    assert "wal-000000000006-000002.log at byte 0" in result.stderr
    assert "--discard-damaged-state" in result.stderr
    with serving(tmp_path, directory, "--discard-damaged-state", name="discard") as server:
        client = PSClient([server.target], retry_timeout=0)
        assert client.stats()[0]["version"] == FIRST
        assert "DISCARD" in server.log()
        client.close()


@pytest.mark.timeout(300)
def test_second_server_on_the_same_directory_is_refused(trained, tmp_path):
    directory = copy(trained, tmp_path)
    with serving(tmp_path, directory, name="first") as first:
        result, port_file = _serve(directory)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "in use by another server" in result.stderr
        assert f'"pid": {first.proc.pid}' in result.stderr and f'"port": {first.port}' in result.stderr
        assert not port_file.exists()
        client = PSClient([first.target], retry_timeout=0)  # the holder is untouched
        assert client.stats()[0]["version"] == FIRST + SECOND
        client.close()
    # the kernel released the lock with the process: the directory can be served again
    with serving(tmp_path, directory, name="again"):
        pass


@pytest.mark.timeout(300)
def test_real_server_refuses_when_no_checkpoint_verifies(trained, tmp_path):
    directory = copy(trained, tmp_path)
    for path in storage.list_checkpoints(directory):
        flip(path, 30)
    result, port_file = _serve(directory)
    assert result.returncode == 2 and not port_file.exists()
    assert "ckpt-000000000006.radps" in result.stderr and "none of the 2 checkpoint" in result.stderr
