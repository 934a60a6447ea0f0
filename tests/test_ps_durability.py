"""Durability: a server killed with SIGKILL in the middle of training.

With --wal no acknowledged push is lost: the restarted server's state equals a single-process
replay of exactly as many pushes as its version says, and that is at least every push that
was acknowledged. Without the log, training resumes from the last checkpoint. SIGTERM writes
a final checkpoint; a worker whose gradients refer to a version the server no longer has is
told to pull again, and the client reconnects by itself while the server restarts.
"""

import threading
import time

import keras
import numpy as np
import pytest

from ps_helpers import ServerProcess
from radam_dist import Lookahead, RectifiedAdam
from radam_dist.ps.client import DataLossError, PSClient

SHAPES = {"w": (16, 8), "emb": (50, 4)}


def optimizer():
    return Lookahead(RectifiedAdam(learning_rate=0.02), sync_period=3)


def initial():
    rng = np.random.default_rng(3)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def gradient(i: int):
    rng = np.random.default_rng(10_000 + i)
    return {"w": rng.normal(size=SHAPES["w"]).astype(np.float32),
            "emb": (rng.normal(size=(5, 4)).astype(np.float32), rng.integers(0, 50, 5))}


def replay(n: int):
    """Single process: the first n gradients through the same optimizer."""
    import tensorflow as tf

    values = initial()
    names = sorted(SHAPES)
    variables = [keras.Variable(values[k], name=k) for k in names]
    opt = optimizer()
    for i in range(n):
        g = gradient(i)
        grads = [tf.IndexedSlices(tf.constant(g[k][0]), tf.constant(g[k][1]), tf.constant(SHAPES[k], tf.int64))
                 if isinstance(g[k], tuple) else tf.constant(g[k]) for k in names]
        opt.apply_gradients(zip(grads, variables))
    return {k: v.numpy() for k, v in zip(names, variables)}


def assert_state(values, n):
    expected = replay(n)
    for k in SHAPES:
        np.testing.assert_allclose(values[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=f"{k} after {n}")


@pytest.mark.timeout(240)
def test_sigkill_with_wal_loses_no_acknowledged_push(tmp_path):
    server = ServerProcess(tmp_path, ["--mode", "async", "--checkpoint-dir", str(tmp_path / "ckpt"),
                                      "--wal", "--checkpoint-interval", "0"])
    try:
        server.start()
        client = PSClient([server.target], retry_timeout=0)
        client.register(initial(), optimizer())
        acked = []
        stop = threading.Event()

        def train():
            i = 0
            while not stop.is_set():
                try:
                    acked.append(client.push(gradient(i)))
                except Exception:  # noqa: BLE001 -- the server died under us
                    return
                i += 1
                if i == 4:
                    client.save_checkpoint()  # later records go to a new WAL segment

        thread = threading.Thread(target=train)
        thread.start()
        deadline = time.monotonic() + 120
        while len(acked) < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill()  # SIGKILL, mid-training
        stop.set()
        thread.join(30)
        assert acked == list(range(1, len(acked) + 1)) and len(acked) >= 10
        server.restart()
        resumed = PSClient([server.target])
        values = resumed.pull()
        version = resumed.stats()[0]["version"]
        # Every acknowledged push survived; at most the one in flight was logged but not acked.
        assert len(acked) <= version <= len(acked) + 1
        assert resumed.stats()[0]["step"] == version
        assert_state(values, version)
    finally:
        server.kill()


@pytest.mark.timeout(240)
def test_sigkill_without_wal_resumes_from_checkpoint_and_sigterm_saves(tmp_path):
    ckpt = tmp_path / "ckpt"
    server = ServerProcess(tmp_path, ["--mode", "async", "--checkpoint-dir", str(ckpt),
                                      "--checkpoint-interval", "0"])
    try:
        server.start()
        client = PSClient([server.target])
        client.register(initial(), optimizer())
        for i in range(5):
            client.push(gradient(i))
        (_, saved), = client.save_checkpoint()
        assert saved == 5
        for i in range(5, 8):
            client.push(gradient(i))
        server.kill()
        server.proc.wait(30)
        # The client reconnects by itself while the server comes back.
        restarter = threading.Timer(0.5, lambda: server.start())
        restarter.start()
        # Pushes 6..8 were only in memory: the client saw version 8, so it is told, never
        # "stale, pull and continue" (the job's parameters went back in time).
        with pytest.raises(DataLossError, match="is at version 5, but this client already saw version 8"):
            client.pull()
        restarter.join()
        with pytest.raises(DataLossError, match="computed at version 8, but this server is at version 5"):
            client.push(gradient(5))
        assert client.stats()[0]["version"] == 5
        # Whoever decides to go on from the checkpoint starts a new client there.
        client = PSClient([server.target])
        assert_state(client.pull(), 5)
        for i in range(5, 7):
            client.push(gradient(i))
        assert server.terminate() == 0  # SIGTERM: final checkpoint, clean exit
        server.start()
        again = PSClient([server.target])
        assert again.stats()[0]["version"] == 7
        assert_state(again.pull(), 7)
    finally:
        server.kill()


def test_checkpoint_file_is_checksummed_and_falls_back(tmp_path):
    """A damaged newest checkpoint is skipped in favour of the previous one."""
    from radam_dist.ps import storage

    meta = {"version": 1}
    storage.write_checkpoint(tmp_path, meta, {"a": np.arange(4, dtype=np.float32)})
    storage.write_checkpoint(tmp_path, {"version": 2}, {"a": np.arange(4, dtype=np.float32) * 2})
    newest = storage.list_checkpoints(tmp_path)[-1]
    data = bytearray(newest.read_bytes())
    data[-40] ^= 0xFF
    newest.write_bytes(bytes(data))
    path, meta, arrays = storage.load_latest_checkpoint(tmp_path)
    assert meta["version"] == 1 and path.name == "ckpt-000000000001.radps"
    np.testing.assert_array_equal(arrays["a"], np.arange(4, dtype=np.float32))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_wal_drops_a_torn_tail(tmp_path):
    from radam_dist.ps import storage
    from radam_dist.ps.pushes import Gradient

    wal = storage.WriteAheadLog(tmp_path)
    wal.start_segment(0)
    wal.append(0, ["a"], {"w": Gradient(np.ones(3, np.float32))})
    wal.append(1, ["b"], {"e": Gradient(np.ones((2, 2), np.float32), np.array([0, 1]))})
    wal.close()
    segment = wal.segments()[0]
    with open(segment, "ab") as f:
        f.write(storage.encode_record(2, ["c"], {"w": Gradient(np.ones(3, np.float32))})[:-5])
    log = storage.WriteAheadLog(tmp_path)
    records = [r for _, r in log.read(log.chain(wal.seq))]
    assert [(r.version_before, r.request_ids) for r in records] == [(0, ["a"]), (1, ["b"])]
    np.testing.assert_array_equal(records[1].grads["e"].indices, [0, 1])
    assert len(list(log.read(log.chain(wal.seq)))) == 2  # truncated for good
    assert [p.name for p in tmp_path.glob("*.torn-*")]  # the dropped bytes are kept
