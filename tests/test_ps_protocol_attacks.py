"""Forged and replayed protocol messages, cross-job calls, per-shard NaN, lost acknowledged state.

A worker holds the bearer token, so anything it can put on the wire is a possible attack (or a
bug in a client); the parameter server must not be talked into applying what shard 0, the
coordinator of a sync round, never decided, nor silently lose state a client was told about.
Real ``radam-ps serve`` processes, real gRPC (raw stubs and ``PSClient``):

1. Forged ``ApplyRound``: pushes of "w0" and "intruder" staged on shard 1 only, then an
   ``ApplyRound`` for them straight to shard 1 -- without a ``decision_mac``, with a random
   one, and with the mac of a genuine earlier decision whose round or members were changed --
   is ``PERMISSION_DENIED`` and changes nothing (version, step and parameters of both shards),
   and the job is not wedged: the next real round commits on both shards. A sync server over
   several shards refuses to start (exit 2) without ``--server-key-file``, or with a key equal
   to the bearer token.
2. Replays: a genuine ``ApplyRound`` after it was applied is answered ``duplicate``; with its
   round changed (the mac no longer fits) ``PERMISSION_DENIED``; a genuine ``CommitRound`` of an
   old round gets the old outcome (or ``ABORTED``) -- never a second application.
3. Cross-job calls: every method naming another job (or "", an old client) on a server that
   holds "jobA" is ``FAILED_PRECONDITION`` ("this server holds job 'jobA'; ...") and changes
   nothing; jobA's own workers carry on.
4. Per-shard NaN with ``--nonfinite skip``: w1's gradient is non-finite only in the rows of one
   shard; the round leaves w1 out on *every* shard (the decision carries it), so both shards end
   equal to a one-process RectifiedAdam that leaves w1 out of exactly those rounds; w1 is told
   (``skipped_pushes``, a WARNING) and shard 0 counts it (``radam_ps_round_members_skipped_total``).
5. A write-ahead log cut exactly at a record boundary (three acknowledged pushes gone, no torn
   record to notice): ``wal.mark`` says more was acknowledged, so the server refuses to start
   (exit 2) unless ``--discard-damaged-state``; the client that saw version 12 then gets
   ``DataLossError`` (``DATA_LOSS``, logged at ERROR), never ``StaleGradientError``.
6. The same cut within the last ``--wal-mark-interval`` is undetectable by the server (it starts
   at the lower version), but the client's next push still learns of the loss (``DATA_LOSS``).
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import grpc
import numpy as np
import pytest

from ps_helpers import REPO, ServerPool, ServerProcess, rpc_code
from radam_dist.ps import placement, storage
from radam_dist.ps.proto import pb, pb_grpc
from radam_dist.ps.tensors import chunk_tensor

SERVER_ENV: dict = {}
SHAPES = {"a": (8, 4), "b": (8, 4)}
SPLIT = 64  # bytes: both variables are split by rows, rows 0-3 on shard 0 and 4-7 on shard 1
CONFIG = {"learning_rate": 0.1}
SYNC_TIMEOUT = 3.0  # also how long an idle worker id blocks a new one on a shard
JOB = "jobA"
COMMITTED = pb.CommitRoundResponse.COMMITTED


# -- helpers --------------------------------------------------------------------------------
def initial():
    rng = np.random.default_rng(5)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def gradient(worker: str, round_: int):
    rng = np.random.default_rng([sum(map(ord, worker)), round_])
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def part(grads, shard: int):
    """The rows of ``grads`` that live on ``shard`` (as PSClient routes them)."""
    out = {}
    for name, value in grads.items():
        p = placement.place(name, value.shape, value.nbytes, 2, SPLIT)
        out[name] = placement.split_dense(p, value)[shard]
    return out


def push_requests(header, grads):
    yield pb.PushRequest(header=header)
    for name in sorted(grads):
        yield from chunk_tensor(pb, name, pb.GRADIENT, grads[name], wrap=pb.PushRequest)


def raw_stage(stub, worker, round_, grads, job=JOB, request_id=None, pushpull=False):
    """A raw sync push with stage=true (what a worker sends in phase 1); returns the request id."""
    request_id = request_id or uuid.uuid4().hex
    header = pb.PushHeader(worker_id=worker, base_version=round_, request_id=request_id, stage=True,
                           job_id=job)
    if pushpull:
        list(stub.PushPull(push_requests(header, grads), timeout=30))
    else:
        response = stub.Push(push_requests(header, grads), timeout=30)
        assert response.staged or response.duplicate, response
    return request_id


def stage_admitted(stub, worker, round_, grads, wait=SYNC_TIMEOUT + 10):
    """raw_stage, retried while the shard still counts another (recently active) worker id as
    one of the job's K: a new id is admitted only in place of one idle for --sync-timeout."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return raw_stage(stub, worker, round_, grads)
        except grpc.RpcError as err:
            if (err.code() != grpc.StatusCode.FAILED_PRECONDITION
                    or "is not one of this sync job" not in (err.details() or "")
                    or time.monotonic() > deadline):
                raise
            time.sleep(0.25)


def apply_round(stub, round_, members, mac=b"", job=JOB):
    request = pb.ApplyRoundRequest(round=round_, job_id=job, decision_mac=mac)
    for m in members:
        if isinstance(m, tuple):
            request.members.add(worker_id=m[0], request_id=m[1])
        else:
            request.members.add().CopyFrom(m)
    return stub.ApplyRound(request, timeout=30)


def decision(stub0, round_):
    """Shard 0's decision of a committed round (members and decision_mac)."""
    r = stub0.CommitRound(pb.CommitRoundRequest(round=round_, query_only=True, job_id=JOB), timeout=30)
    assert r.outcome == COMMITTED, r
    assert len(r.decision_mac) == 32, "a committed decision carries its HMAC-SHA256"
    return r


def states(stubs, job=JOB):
    out = []
    for stub in stubs:
        st = stub.Stats(pb.StatsRequest(job_id=job), timeout=30)
        out.append((st.version, st.step))
    return out


def denied(call):
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    assert rpc_code(excinfo) == "PERMISSION_DENIED", excinfo.value.details()
    return excinfo.value


def sync_round(clients, grads_of):
    """Every client pushes (in its own thread); {worker: returned version or exception}."""
    results = {}

    def push(c):
        try:
            results[c.worker_id] = c.push(grads_of(c.worker_id))
        except Exception as err:  # noqa: BLE001
            results[c.worker_id] = err

    threads = [threading.Thread(target=push, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def genuine_round(job, round_):
    """A real round of w0 and w1 (PSClient); both shards end at round_ + 1."""
    results = sync_round([job["w0"], job["w1"]], lambda w: gradient(w, round_))
    assert results == {"w0": round_ + 1, "w1": round_ + 1}, results
    assert states(job["stubs"]) == [(round_ + 1, round_ + 1)] * 2
    return decision(job["stubs"][0], round_)


def new_client(targets, worker_id, job_id=JOB, **kw):
    from radam_dist.ps.client import PSClient

    return PSClient(targets, worker_id=worker_id, split_threshold_bytes=SPLIT, job_id=job_id,
                    retry_timeout=30, **kw)


def reference(rounds):
    """Single process: RectifiedAdam on the mean gradient of each round's included workers."""
    import keras
    import tensorflow as tf

    from radam_dist import RectifiedAdam

    names = sorted(SHAPES)
    values = initial()
    variables = [keras.Variable(values[n], name=n) for n in names]
    opt = RectifiedAdam(**CONFIG)
    for grads_of, workers in rounds:
        grads = []
        for n in names:
            total = np.zeros(SHAPES[n], np.float32)
            for w in sorted(workers):
                total += grads_of(w)[n]
            grads.append(tf.constant(total / np.float32(len(workers))))
        opt.apply_gradients(zip(grads, variables))
    return {n: v.numpy() for n, v in zip(names, variables)}


def sync_args(d, key, i, extra=()):
    return ["--mode", "sync", "--num-workers", "2", "--num-shards", "2", "--shard-index", str(i),
            "--sync-timeout", str(SYNC_TIMEOUT), "--server-key-file", str(key), *extra]


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Two sync shards with --wal and a server key, registered by job "jobA" (workers w0, w1)."""
    d = tmp_path_factory.mktemp("attacks")
    key = d / "server.key"
    key.write_text(os.urandom(32).hex() + "\n")
    pool = ServerPool(d)
    clients, channels = [], []
    try:
        shards = pool.start(*[sync_args(d, key, i, ["--wal", "--checkpoint-interval", "0",
                                                    "--checkpoint-dir", str(d / f"ckpt{i}")])
                              for i in range(2)], env=SERVER_ENV)
        targets = [s.target for s in shards]
        for w in ("w0", "w1"):
            c = new_client(targets, w)
            c.register(initial(), CONFIG)
            c.pull()
            clients.append(c)
        channels = [grpc.insecure_channel(t) for t in targets]
        yield {"shards": shards, "dir": d, "w0": clients[0], "w1": clients[1], "targets": targets,
               "stubs": [pb_grpc.ParameterServerStub(ch) for ch in channels]}
    finally:
        for c in clients:
            c.close()
        for ch in channels:
            ch.close()
        pool.close()


# -- 1. forged ApplyRound -------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_forged_apply_round_is_denied_and_the_job_goes_on(job):
    stub0, stub1 = job["stubs"]
    r = states(job["stubs"])[0][0]
    assert states(job["stubs"]) == [(r, r)] * 2
    before = job["w0"].pull()

    def unchanged(version):
        assert states(job["stubs"]) == [(version, version)] * 2
        after = job["w0"].pull()
        for n in SHAPES:
            np.testing.assert_array_equal(after[n], before[n], err_msg=n)

    # The attack: "w0" and "intruder" staged on shard 1 only, then shard 1 is told that
    # shard 0 decided a round of exactly those two pushes.
    rid_w0 = raw_stage(stub1, "w0", r, part(gradient("w0", 100), 1))
    rid_in = stage_admitted(stub1, "intruder", r, part(gradient("intruder", 100), 1))
    staged_at = time.monotonic()
    forged = [("intruder", rid_in), ("w0", rid_w0)]
    denied(lambda: apply_round(stub1, r, forged))  # (a) no decision_mac
    denied(lambda: apply_round(stub1, r, forged, os.urandom(32)))  # (b) a random mac
    unchanged(r)

    # A genuine round (w1 can take the intruder's place once it has been idle --sync-timeout).
    time.sleep(max(0.0, staged_at + SYNC_TIMEOUT + 1 - time.monotonic()))
    genuine = genuine_round(job, r)
    assert sorted(m.worker_id for m in genuine.members) == ["w0", "w1"]
    after_genuine = job["w0"].pull()
    assert all(not np.array_equal(after_genuine[n], before[n]) for n in SHAPES)
    before = after_genuine

    # (c) the mac of that genuine decision, with the round and/or the members changed, for the
    # pending round r + 1 for which "w0" and "intruder" staged on shard 1
    rid_w0 = raw_stage(stub1, "w0", r + 1, part(gradient("w0", 101), 1))
    rid_in = stage_admitted(stub1, "intruder", r + 1, part(gradient("intruder", 101), 1))
    staged_at = time.monotonic()
    mac = genuine.decision_mac
    denied(lambda: apply_round(stub1, r + 1, genuine.members, mac))  # round changed
    denied(lambda: apply_round(stub1, r + 1, [("intruder", rid_in), ("w0", rid_w0)], mac))
    w0_member = next(m for m in genuine.members if m.worker_id == "w0")
    denied(lambda: apply_round(stub1, r + 1, [("intruder", rid_in), (w0_member.worker_id,
                                                                      w0_member.request_id)], mac))
    unchanged(r + 1)

    # not wedged: the next real round commits on both shards, at the same version
    time.sleep(max(0.0, staged_at + SYNC_TIMEOUT + 1 - time.monotonic()))
    genuine_round(job, r + 1)
    values = job["w0"].pull()
    assert all(not np.array_equal(values[n], before[n]) for n in SHAPES)
    before = values

    # the genuine mac of round r with its members altered (a member replaced, or a member's
    # skipped flag flipped) is no decision either, even for a round already applied
    altered = [pb.RoundMember(worker_id=m.worker_id, request_id=m.request_id) for m in genuine.members]
    altered[1] = pb.RoundMember(worker_id="intruder", request_id=rid_in)
    denied(lambda: apply_round(stub1, r, altered, mac))
    flipped = [pb.RoundMember(worker_id=m.worker_id, request_id=m.request_id,
                              skipped=m.worker_id == "w1") for m in genuine.members]
    denied(lambda: apply_round(stub1, r, flipped, mac))
    unchanged(r + 2)


@pytest.mark.timeout(120)
def test_sync_shards_need_a_server_key_that_is_not_the_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RADAM_PS_SERVER_KEY", "RADAM_PS_TOKEN")}
    env.update(SERVER_ENV, TF_CPP_MIN_LOG_LEVEL="3")
    base = [sys.executable, "-m", "radam_dist.ps.cli", "serve", "--host", "127.0.0.1", "--port", "0",
            "--mode", "sync", "--num-workers", "2", "--num-shards", "2", "--shard-index", "1"]

    def run(*extra):
        try:
            return subprocess.run(base + list(extra), cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"radam-ps serve {' '.join(extra)} started serving instead of refusing")

    p = run()
    assert p.returncode == 2, p.stderr[-3000:]
    assert "--server-key-file" in p.stderr.strip().splitlines()[-1], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    token = tmp_path / "token"
    token.write_text("the-same-secret-for-both\n")
    key = tmp_path / "key"
    key.write_text("the-same-secret-for-both\n")
    p = run("--token-file", str(token), "--server-key-file", str(key))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "token" in p.stderr.lower() and "key" in p.stderr.lower(), p.stderr[-3000:]
    assert "Traceback" not in p.stderr


# -- 2. replayed round messages -------------------------------------------------------------
@pytest.mark.timeout(180)
def test_replayed_round_messages_apply_nothing_twice(job):
    stub0, stub1 = job["stubs"]
    r = states(job["stubs"])[0][0]
    genuine = genuine_round(job, r)
    values = job["w0"].pull()

    def unchanged():
        assert states(job["stubs"]) == [(r + 1, r + 1)] * 2
        now = job["w0"].pull()
        for n in SHAPES:
            np.testing.assert_array_equal(now[n], values[n], err_msg=n)

    # the same ApplyRound again: duplicate, nothing applied
    response = apply_round(stub1, r, genuine.members, genuine.decision_mac)
    assert response.duplicate and (response.version, response.step) == (r + 1, r + 1), response
    unchanged()
    # the same decision for the next round: the mac does not fit
    denied(lambda: apply_round(stub1, r + 1, genuine.members, genuine.decision_mac))
    unchanged()
    # a genuine CommitRound of the old round: its old outcome (or ABORTED), never a second round
    member = next(m for m in genuine.members if m.worker_id == "w0")
    try:
        again = stub0.CommitRound(pb.CommitRoundRequest(round=r, worker_id="w0",
                                                        request_id=member.request_id, job_id=JOB),
                                  timeout=30)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.ABORTED, err.details()
    else:
        assert again.outcome == COMMITTED and again.round == r, again
        assert [(m.worker_id, m.request_id) for m in again.members] == [
            (m.worker_id, m.request_id) for m in genuine.members]
    unchanged()
    # the staged push itself, replayed (same request id) on shard 1: nothing staged or applied
    try:
        raw_stage(stub1, "w0", r, part(gradient("w0", r), 1), request_id=member.request_id)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.ABORTED, err.details()
    unchanged()
    # and the job goes on
    genuine_round(job, r + 1)


# -- 3. cross-job calls ---------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_calls_naming_another_job_are_refused(job):
    stub0, stub1 = job["stubs"]
    r = states(job["stubs"])[0][0]
    genuine = genuine_round(job, r)  # jobA works
    values = job["w0"].pull()
    ckpt0 = job["dir"] / "ckpt0"
    checkpoints = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt0.glob("ckpt-*"))

    def unchanged():
        assert states(job["stubs"]) == [(r + 1, r + 1)] * 2
        now = job["w0"].pull()
        for n in SHAPES:
            np.testing.assert_array_equal(now[n], values[n], err_msg=n)

    # a jobB worker that never registered
    other = new_client(job["targets"], "w0", job_id="jobB")
    try:
        with pytest.raises(grpc.RpcError) as excinfo:
            other.push(gradient("w0", r + 1))
        assert rpc_code(excinfo) == "FAILED_PRECONDITION", excinfo.value
    finally:
        other.close()
    unchanged()

    # every method, raw, each call otherwise valid (it would be answered for job "jobA")
    grads = gradient("w0", r + 1)
    calls = {
        "Push": lambda job_id: raw_stage(stub0, "w0", r + 1, part(grads, 0), job=job_id),
        "PushPull": lambda job_id: raw_stage(stub1, "w0", r + 1, part(grads, 1), job=job_id,
                                             pushpull=True),
        "Pull": lambda job_id: list(stub0.Pull(pb.PullRequest(if_newer_than=-1, job_id=job_id),
                                               timeout=30)),
        "Stats": lambda job_id: stub1.Stats(pb.StatsRequest(job_id=job_id), timeout=30),
        "SaveCheckpoint": lambda job_id: stub0.SaveCheckpoint(
            pb.SaveCheckpointRequest(job_id=job_id), timeout=30),
        "CommitRound": lambda job_id: stub0.CommitRound(pb.CommitRoundRequest(
            round=r, query_only=True, job_id=job_id), timeout=30),
        "ApplyRound": lambda job_id: apply_round(stub1, r, genuine.members, genuine.decision_mac,
                                                 job=job_id),
    }
    for method, call in calls.items():
        with pytest.raises(grpc.RpcError) as excinfo:
            call("jobB")
        details = excinfo.value.details() or ""
        assert rpc_code(excinfo) == "FAILED_PRECONDITION", (method, details)
        assert details.startswith("this server holds job 'jobA'"), (method, details)
        assert "'jobB'" in details, (method, details)
        states(job["stubs"])  # jobA's own calls are answered in between
    # an old client (no job id) against a server holding job "jobA"
    with pytest.raises(grpc.RpcError) as excinfo:
        calls["Push"]("")
    assert rpc_code(excinfo) == "FAILED_PRECONDITION", excinfo.value.details()
    assert excinfo.value.details().startswith("this server holds job 'jobA'"), excinfo.value.details()
    unchanged()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ckpt0.glob("ckpt-*")) == checkpoints
    # the same calls for "jobA" are answered (the refusals were about the job alone)
    calls["CommitRound"](JOB)
    assert calls["ApplyRound"](JOB).duplicate
    genuine_round(job, r + 1)


# -- 4. per-shard NaN: one decision for every shard -----------------------------------------
ROUNDS = 5
BAD = {1: (1, "a", np.nan), 3: (0, "b", np.inf)}  # round -> (shard whose rows are bad, variable, value)


def nan_gradient(worker, round_):
    g = gradient(worker, round_)
    if worker == "w1" and round_ in BAD:
        shard, name, bad = BAD[round_]
        g[name][4 * shard:4 * shard + 4] = bad  # only the rows that live on that shard
    return g


def metrics_url(server) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = re.search(r"metrics on http://([^\"\s]+)/metrics", server.log())
        if m:
            return f"http://{m.group(1)}/metrics"
        time.sleep(0.05)
    raise AssertionError("no 'metrics on' line in the log:\n" + server.log())


def metric_sum(url, name) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total, seen = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)", line)
        if m:
            total, seen = total + float(m.group(2)), True
    assert seen, f"no {name} in the metrics:\n{text[-3000:]}"
    return total


@pytest.mark.timeout(240)
def test_a_non_finite_gradient_on_one_shard_leaves_the_worker_out_everywhere(tmp_path, caplog,
                                                                            monkeypatch):
    key = tmp_path / "server.key"
    key.write_text(os.urandom(32).hex() + "\n")
    pool = ServerPool(tmp_path)
    clients = []
    try:
        shards = pool.start(*[sync_args(tmp_path, key, i, ["--nonfinite", "skip", "--sync-timeout",
                                                           "20", "--metrics-port", "0"])
                              for i in range(2)], env=SERVER_ENV)
        targets = [s.target for s in shards]
        for w in ("w0", "w1"):
            c = new_client(targets, w)
            c.register(initial(), CONFIG)
            c.pull()
            clients.append(c)
        w0, w1 = clients
        caplog.set_level("WARNING", logger="radam_dist.ps.client")
        for round_ in range(ROUNDS):
            results = sync_round(clients, lambda w: nan_gradient(w, round_))
            assert results == {"w0": round_ + 1, "w1": round_ + 1}, (round_, results)
        channels = [grpc.insecure_channel(t) for t in targets]
        try:
            stubs = [pb_grpc.ParameterServerStub(ch) for ch in channels]
            assert states(stubs) == [(ROUNDS, ROUNDS)] * 2
            for round_ in range(ROUNDS):  # the decision names w1 as skipped in exactly those rounds
                d = decision(stubs[0], round_)
                assert {m.worker_id: m.skipped for m in d.members} == {
                    "w0": False, "w1": round_ in BAD}, (round_, d)
        finally:
            for ch in channels:
                ch.close()
        values = w0.pull()
        expected = reference([(lambda w, r=r: gradient(w, r), ["w0"] if r in BAD else ["w0", "w1"])
                              for r in range(ROUNDS)])
        for n in SHAPES:
            assert np.isfinite(values[n]).all(), n
            np.testing.assert_allclose(values[n], expected[n], rtol=1e-6, atol=1e-7, err_msg=n)
        assert (w0.skipped_pushes, w1.skipped_pushes) == (0, len(BAD))
        warnings = [rec for rec in caplog.records
                    if rec.name == "radam_dist.ps.client" and rec.levelno == 30]
        assert len(warnings) >= len(BAD), [rec.getMessage() for rec in caplog.records]
        assert metric_sum(metrics_url(shards[0]), "radam_ps_round_members_skipped_total") == len(BAD)
    finally:
        for c in clients:
            c.close()
        pool.close()


# -- 5, 6. acknowledged state lost to a cut at a record boundary ---------------------------
PUSHES, KEPT = 12, 9


def async_gradient(i):
    return {"v": np.linspace(-1, 1, 16, dtype=np.float32) * np.float32(0.1 * (i + 1))}


@pytest.fixture
def procs():
    started = []
    yield started
    for s in started:
        s.kill()
        if s.proc is not None:
            try:
                s.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


def train_and_cut(tmp_path, procs, mark_interval):
    """A --wal server acknowledges 12 pushes, is SIGKILLed, and its newest segment is cut right
    after the 9th record. Returns (the stopped server, its arguments, the client that saw
    version 12, the values at version 9, the cut segment)."""
    from radam_dist.ps.client import PSClient

    ckpt = tmp_path / "ckpt"
    args = ["--mode", "async", "--wal", "--checkpoint-dir", str(ckpt), "--checkpoint-interval", "0",
            "--wal-mark-interval", str(mark_interval), "--max-staleness", "-1"]
    server = ServerProcess(tmp_path, args, SERVER_ENV, name="ps")
    procs.append(server)
    server.start()
    client = PSClient([server.target], worker_id="w0", retry_timeout=30)
    client.register({"v": np.ones(16, np.float32)}, CONFIG)
    at9 = None
    for i in range(PUSHES):
        assert client.push(async_gradient(i)) == i + 1
        if i + 1 == KEPT:
            at9 = client.pull()["v"]
    assert client.versions == [PUSHES]
    time.sleep(1.0)  # (test 5: the mark, written every 0.2 s, now says version 12)
    server.kill(signal.SIGKILL)
    server.proc.wait(30)
    wal = storage.WriteAheadLog(ckpt)
    segment = wal.segments()[-1]
    data = segment.read_bytes()
    records, damage = storage.scan_segment(data, segment, newest=True)
    assert damage is None
    applied = [(offset, storage.decode_record(payload)) for offset, payload in records]
    applied = [(offset, rec) for offset, rec in applied if rec.kind == "apply"]
    assert [rec.version_before for _, rec in applied] == list(range(PUSHES))
    cut = next(offset for offset, rec in applied if rec.version_before == KEPT)
    with open(segment, "r+b") as f:  # a cut exactly at a record boundary: nothing looks torn
        f.truncate(cut)
        os.fsync(f.fileno())
    assert storage.scan_segment(segment.read_bytes(), segment, newest=True)[1] is None
    return server, args, client, at9, segment


def version_of(server):
    from radam_dist.ps.client import PSClient

    c = PSClient([server.target], retry_timeout=30)
    try:
        return c.stats()[0]["version"], c.pull()["v"]
    finally:
        c.close()


def assert_data_loss_on_push(server, client):
    from radam_dist.ps import DataLossError
    from radam_dist.ps.client import StaleGradientError

    logged = len(server.log_path.read_text())
    with pytest.raises(DataLossError) as excinfo:
        client.push(async_gradient(99))
    assert not isinstance(excinfo.value, StaleGradientError)
    assert version_of(server)[0] == KEPT  # nothing applied
    deadline = time.monotonic() + 5
    while True:
        new = server.log_path.read_text()[logged:]
        if any(" ERROR " in line for line in new.splitlines()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(" ERROR " in line for line in new.splitlines()), new[-3000:]


@pytest.mark.timeout(180)
def test_wal_cut_at_a_record_boundary_before_the_mark_refuses_to_start(tmp_path, procs):
    from radam_dist.ps import DataLossError

    server, args, client, at9, segment = train_and_cut(tmp_path, procs, 0.2)
    assert (tmp_path / "ckpt" / "wal.mark").exists()
    size = segment.stat().st_size
    # restart: the log ends at version 9, wal.mark says 12 were acknowledged -> exit 2
    refused = ServerProcess(tmp_path, args, SERVER_ENV, name="refused", port=server.port)
    procs.append(refused)
    refused.start(wait=False)
    deadline = time.monotonic() + 90
    while refused.proc.poll() is None:
        if (tmp_path / "refused.port").exists() or time.monotonic() > deadline:
            pytest.fail("the server started on a log that ends before wal.mark:\n" + refused.log())
        time.sleep(0.05)
    rc = refused.proc.returncode
    text = refused.log()
    assert rc == 2, text
    line = next((x for x in text.splitlines() if "refusing to start" in x), "")
    assert "wal.mark" in line and re.search(r"\b9\b", line) and re.search(r"\b12\b", line), text
    assert segment.stat().st_size == size  # the refusal changed nothing on disk
    # --discard-damaged-state starts at the lower version, saying so
    resumed = ServerProcess(tmp_path, args + ["--discard-damaged-state"], SERVER_ENV,
                            name="discard", port=server.port)
    procs.append(resumed)
    resumed.start()
    assert "DISCARDING" in resumed.log(), resumed.log()
    version, values = version_of(resumed)
    assert version == KEPT
    np.testing.assert_allclose(values, at9, rtol=1e-6, atol=1e-7)
    # the client that saw version 12: DATA_LOSS, never "stale"
    assert_data_loss_on_push(resumed, client)
    channel = grpc.insecure_channel(resumed.target)
    try:
        with pytest.raises(grpc.RpcError) as excinfo:
            list(pb_grpc.ParameterServerStub(channel).Pull(pb.PullRequest(if_newer_than=PUSHES),
                                                           timeout=30))
        assert rpc_code(excinfo) == "DATA_LOSS", excinfo.value.details()
    finally:
        channel.close()
    with pytest.raises(DataLossError):  # a pull lower than a version it saw
        client.pull()
    client.close()


@pytest.mark.timeout(180)
def test_cut_after_the_last_mark_is_undetectable_but_the_client_gets_data_loss(tmp_path, procs):
    """With --wal-mark-interval 60 the mark is written only at checkpoints (here: the
    registration, at version 0), so a log cut at a record boundary after it looks complete:
    the server cannot tell that three acknowledged pushes are gone and starts at version 9.
    That remains undetectable on the server; the client that saw version 12 learns it with
    its next push (DATA_LOSS -> DataLossError)."""
    server, args, client, at9, _ = train_and_cut(tmp_path, procs, 60)
    server.start()  # the same port
    version, values = version_of(server)
    assert version == KEPT
    np.testing.assert_allclose(values, at9, rtol=1e-6, atol=1e-7)
    assert_data_loss_on_push(server, client)
    client.close()
