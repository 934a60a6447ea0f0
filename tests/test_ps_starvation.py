"""Clients that try to starve a parameter server, frozen peers, a shared port: real servers.

Real ``radam-ps serve`` processes on loopback and real gRPC clients (raw stubs where a client
must misbehave, ``PSClient`` otherwise). What is checked, and why:

1. Stalled streams: 40 Push streams that send a header and then nothing. The calls beyond
   ``--max-threads`` minus ``--reserved-threads`` are refused RESOURCE_EXHAUSTED at once,
   health checks and Stats still answer within 1 s (they have threads of their own), the
   admitted stalls are cancelled by ``--stream-idle-timeout``, and then training works; the
   server's memory does not grow with the stalls.
2. Made-up worker ids in sync mode: only the job's ``--num-workers`` ids may stage; 16 others
   pushing 18 MiB each are refused FAILED_PRECONDITION before anything is held (the server's
   memory grows by at most about one push), and staged pushes are charged to
   ``--max-inflight-bytes`` (admitted workers cannot hold more than the budget either).
3. A flood of 1000 short connections does not slow a worker's pulls.
4. A port another process holds (a running server's gRPC port, SO_REUSEPORT or not, or the
   metrics port): the second server exits 2 at once naming it, and the first one keeps
   serving alone.
5. A frozen (SIGSTOPped) shard: a client's call fails UNAVAILABLE within keepalive time +
   timeout instead of hanging; after SIGCONT the shard serves again.
6. A frozen client: the server's keepalive ends its half-sent push and gives the in-flight
   budget back within keepalive time + timeout (even after the connection idled).
7. Shards frozen for 5 s in turn during sync training over two shards (signed decisions,
   --wal): every acknowledged round is applied exactly once on both shards, and the
   parameters equal a one-process RectifiedAdam replay.

Every request loop is bounded in count and time; every measured figure is printed.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps_helpers import REPO, ServerPool, rpc_code
from radam_dist.ps.client import PSClient
from radam_dist.ps.proto import pb, pb_grpc
from radam_dist.ps.tensors import chunk_tensor

MiB = 1 << 20

# Server 'stall' (tests 1 and 4): 16 threads, 4 of them kept for health checks and Stats.
MAX_THREADS, RESERVED, IDLE_S = 16, 4, 3.0
ADMITTED = MAX_THREADS - RESERVED
STALL_VALUES = {"w": np.zeros((256, 64), np.float32), "b": np.zeros(64, np.float32)}

# Server 'keepalive' (tests 3, 5, 6): pings every 2 s, 1 s to answer; a budget of one "big" push.
KA_TIME, KA_TIMEOUT, SLACK = 2.0, 1.0, 3.0


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until the kernel shows it stopped: the signal takes effect when
    its threads next enter the kernel, and a busy gRPC thread can answer a call before that."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = set()
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    states.add(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that just ended
                pass
        if states == {"T"}:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop within 5 s of SIGSTOP")
BIG_N = 1 << 20  # float32: 4 MiB
KA_VALUES = {"big": np.zeros(BIG_N, np.float32), "small": np.zeros(16, np.float32)}
KA_BUDGET = 4 * MiB + 64 * 1024  # one push of "big" + "small" fits, two "big" do not

# Server 'sync' (test 2): two workers; a budget that holds two staged 18 MiB pushes, not three.
SYNC_N = 18 * MiB // 4  # float32: 18 MiB
SYNC_BUDGET = 40 * MiB
SYNC_CONFIG = {"learning_rate": 0.01}

# Shards (test 7): both variables split by rows, so every round touches both shards.
SHAPES = {"a": (8, 4), "b": (8, 4)}
SPLIT = 64
CONFIG = {"learning_rate": 0.1}
ROUNDS = 60
SERVER_ENV: dict = {}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """All servers of this file, started at once (each imports TensorFlow: slow on 2 cores)."""
    d = tmp_path_factory.mktemp("starvation")
    key = d / "server.key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    sharded = ["--mode", "sync", "--num-workers", "2", "--sync-timeout", "30", "--num-shards", "2",
               "--server-key-file", str(key), "--wal", "--checkpoint-interval", "0"]
    pool = ServerPool(d)
    try:
        started = pool.start(
            ["--mode", "async", "--max-staleness", "-1", "--max-threads", str(MAX_THREADS),
             "--reserved-threads", str(RESERVED), "--stream-idle-timeout", f"{IDLE_S:g}"],
            ["--mode", "async", "--max-staleness", "-1", "--keepalive-time", f"{KA_TIME:g}",
             "--keepalive-timeout", f"{KA_TIMEOUT:g}", "--stream-idle-timeout", "60",
             "--max-inflight-bytes", str(KA_BUDGET)],
            ["--mode", "sync", "--num-workers", "2", "--sync-timeout", "30",
             "--max-inflight-bytes", str(SYNC_BUDGET)],
            sharded + ["--shard-index", "0", "--checkpoint-dir", str(d / "ckpt0")],
            sharded + ["--shard-index", "1", "--checkpoint-dir", str(d / "ckpt1")], env=SERVER_ENV)
        out = dict(zip(("stall", "keepalive", "sync", "shard0", "shard1"), started))
        for name, values in (("stall", STALL_VALUES), ("keepalive", KA_VALUES)):
            with PSClient([out[name].target], retry_timeout=30) as c:
                c.register(values, {"learning_rate": 0.01})
        yield out
    finally:
        pool.close()


# -- helpers ------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class RssSampler:
    """The largest VmRSS of ``pid`` seen while the block runs (sampled every 10 ms)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_bytes(pid), threading.Event()

    def _run(self):
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, RuntimeError):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def fresh_channel(target: str) -> grpc.Channel:
    """A channel with a connection of its own (channels otherwise share subchannels)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def health_check(channel, timeout: float = 5.0) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def stage_requests(worker: str, round_: int, request_id: str, grad: np.ndarray):
    yield pb.PushRequest(header=pb.PushHeader(worker_id=worker, base_version=round_,
                                              request_id=request_id, stage=True))
    yield from chunk_tensor(pb, "g", pb.GRADIENT, grad, MiB, wrap=pb.PushRequest)


def sync_round(clients, grads) -> list:
    """Each client pushes its gradient in a thread of its own; the versions (or errors)."""
    out = [None] * len(clients)

    def push(i):
        try:
            out[i] = clients[i].push(grads[i])
        except Exception as err:  # noqa: BLE001
            out[i] = err

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return out


# -- 1. stalled streams ---------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_stalled_streams_do_not_starve_health_stats_or_training(servers):
    server = servers["stall"]
    pid = server.proc.pid
    worker = PSClient([server.target], worker_id="normal", retry_timeout=10)
    worker.attach()
    grads = {n: np.ones_like(v) for n, v in STALL_VALUES.items()}
    worker.push(grads)  # warm: the first push's buffers and threads exist before the baseline
    worker.pull()
    rss_before = rss_bytes(pid)

    streams = 40
    gate = threading.Event()
    results = {}
    channels = [fresh_channel(server.target) for _ in range(8)]

    def stalled(i):
        stub = pb_grpc.ParameterServerStub(channels[i % len(channels)])

        def requests():
            yield pb.PushRequest(header=pb.PushHeader(worker_id=f"stall-{i}", base_version=0,
                                                      request_id=f"stall-{i}"))
            gate.wait(60)  # then nothing: a stalled client

        t0 = time.monotonic()
        try:
            stub.Push(requests(), timeout=30)
            results[i] = ("OK", time.monotonic() - t0)
        except grpc.RpcError as err:
            results[i] = (err.code().name, time.monotonic() - t0)

    threads = [threading.Thread(target=stalled, args=(i,), daemon=True) for i in range(streams)]
    try:
        start = time.monotonic()
        for t in threads:
            t.start()
        wait_for(lambda: sum(r[0] == "RESOURCE_EXHAUSTED" for r in list(results.values()))
                 >= streams - ADMITTED, 1.5)
        refused = {i: r for i, r in list(results.items()) if r[0] == "RESOURCE_EXHAUSTED"}
        # While the admitted ones stall: health checks (new connection) and Stats answer fast.
        probe = fresh_channel(server.target)
        health_s, stats_s = [], []
        for _ in range(10):
            t = time.monotonic()
            assert health_check(probe, timeout=5) == "SERVING"
            health_s.append(time.monotonic() - t)
        observer = PSClient([server.target], retry_timeout=0, call_timeout=5)
        for _ in range(10):
            t = time.monotonic()
            observer.stats()
            stats_s.append(time.monotonic() - t)
        checked_at = time.monotonic() - start
        still_stalled = streams - len(results)
        print(f"\nstalls: {len(refused)} of {streams} refused RESOURCE_EXHAUSTED (slowest "
              f"{max((r[1] for r in refused.values()), default=0):.3f}s), {still_stalled} stalled at "
              f"{checked_at:.2f}s; worst health {max(health_s) * 1e3:.1f} ms, worst Stats "
              f"{max(stats_s) * 1e3:.1f} ms")
        assert checked_at < IDLE_S - 0.5, "the checks did not run while the streams stalled"
        assert still_stalled == ADMITTED, results
        assert len(refused) == streams - ADMITTED, results
        assert max(r[1] for r in refused.values()) < 1.0, refused
        assert max(health_s) < 1.0 and max(stats_s) < 1.0
        # The idle timeout ends every admitted stall (server-side cancel, not the client's 30 s).
        wait_for(lambda: len(results) == streams, IDLE_S + 5, 0.05)
        ended = {i: r for i, r in results.items() if i not in refused}
        print("stalls ended: " + ", ".join(sorted({f"{c}" for c, _ in ended.values()})) +
              f" after {min((r[1] for r in ended.values()), default=0):.2f}-"
              f"{max((r[1] for r in ended.values()), default=0):.2f}s")
        assert len(results) == streams, f"{streams - len(results)} streams still open"
        assert all(code not in ("OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
                   for code, _ in ended.values()), ended
        assert all(IDLE_S - 0.5 <= s <= IDLE_S + 5 for _, s in ended.values()), ended
        probe.close()
        observer.close()
    finally:
        gate.set()
        for t in threads:
            t.join(10)
        for c in channels:
            c.close()
    # each cancelled stall is logged at WARNING with the method and the peer
    lines = [x for x in server.log().splitlines()
             if "WARNING" in x and "Push" in x and "127.0.0.1" in x and "RESOURCE_EXHAUSTED" not in x]
    assert lines, server.log()[-3000:]
    # training works afterwards
    version = worker.versions[0]
    assert worker.push(grads) == version + 1
    assert worker.pull()["w"].shape == STALL_VALUES["w"].shape
    rss_after = rss_bytes(pid)
    grown = rss_after - rss_before
    print(f"server RSS {rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB ({grown / MiB:+.1f} MiB)")
    # The stalls carry no tensor bytes: what they may cost is at most 16 handler threads'
    # touched stacks and gRPC's few KB per stream, far below 32 MiB.
    assert grown < 32 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"
    worker.close()


# -- 2. made-up worker ids, staged memory ---------------------------------------------------------
@pytest.mark.timeout(180)
def test_made_up_worker_ids_are_refused_before_anything_is_held(servers):
    server = servers["sync"]
    pid = server.proc.pid
    rng = np.random.default_rng(0)
    w0 = PSClient([server.target], worker_id="w0", retry_timeout=30)
    w0.register({"g": np.zeros(SYNC_N, np.float32)}, SYNC_CONFIG)
    w1 = PSClient([server.target], worker_id="w1", retry_timeout=30)
    w1.attach()
    grad = {"g": rng.normal(size=SYNC_N).astype(np.float32)}
    assert sync_round([w0, w1], [grad, grad]) == [1, 1]
    version = 1

    # 16 made-up ids push 18 MiB each, at once: each refused, nothing held.
    rss_before = rss_bytes(pid)
    outcomes = [None] * 16
    elapsed = [0.0] * 16

    def intruder(i):
        c = PSClient([server.target], worker_id=f"x{i}", retry_timeout=0)
        try:
            c.attach()
            c.versions = [version]  # current: only the worker id is wrong
            t = time.monotonic()
            try:
                outcomes[i] = c.push(grad)
            except Exception as err:  # noqa: BLE001
                outcomes[i] = err
            elapsed[i] = time.monotonic() - t
        finally:
            c.close()

    with RssSampler(pid) as sampler:
        threads = [threading.Thread(target=intruder, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    time.sleep(0.5)
    rss_after = rss_bytes(pid)
    print(f"\nmade-up ids: server RSS {rss_before / MiB:.1f} -> {rss_after / MiB:.1f} MiB "
          f"(peak {sampler.peak / MiB:.1f} MiB; one staged push is {SYNC_N * 4 / MiB:.0f} MiB); "
          f"refusals took {min(elapsed):.2f}-{max(elapsed):.2f}s")
    for i, out in enumerate(outcomes):
        assert isinstance(out, grpc.RpcError), (i, out)
        assert out.code().name == "FAILED_PRECONDITION", (i, out)
        assert "not one of this sync job's 2 workers" in out.details(), out.details()
    limit = SYNC_N * 4 * 3 // 2  # about one staged push (nothing is staged for them)
    assert rss_after - rss_before < limit, f"RSS grew by {(rss_after - rss_before) / MiB:.1f} MiB"
    assert sampler.peak - rss_before < limit, f"RSS peaked {(sampler.peak - rss_before) / MiB:.1f} MiB up"

    # a raw staged push from a made-up id, at the current round, is refused the same way
    stub = pb_grpc.ParameterServerStub(w0._channels[0])
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Push(stage_requests("x-raw", version, "raw-1", grad["g"]), timeout=60)
    assert rpc_code(excinfo) == "FAILED_PRECONDITION"
    assert "not one of this sync job's 2 workers" in excinfo.value.details(), excinfo.value.details()
    stats = w0.stats()[0]
    assert stats["version"] == version
    # the job's own workers still run rounds
    assert sync_round([w0, w1], [grad, grad]) == [2, 2]
    version = 2

    # Staged pushes are charged to --max-inflight-bytes (40 MiB): w0 and w1 stage one push each
    # (36 MiB held until their round is applied); a second push from either does not fit.
    assert stub.Push(stage_requests("w0", version, "w0-a", grad["g"]), timeout=60).staged
    assert stub.Push(stage_requests("w1", version, "w1-a", grad["g"]), timeout=60).staged
    for worker, rid in (("w0", "w0-b"), ("w1", "w1-b")):
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Push(stage_requests(worker, version, rid, grad["g"]), timeout=60)
        assert rpc_code(excinfo) == "RESOURCE_EXHAUSTED", excinfo.value.details()
        assert "--max-inflight-bytes" in excinfo.value.details()
    # committing the two staged pushes applies the round and gives their bytes back
    committed = {}

    def commit(worker, rid):
        try:
            committed[worker] = stub.CommitRound(pb.CommitRoundRequest(
                round=version, worker_id=worker, request_id=rid), timeout=60).version
        except grpc.RpcError as err:
            committed[worker] = err

    threads = [threading.Thread(target=commit, args=a) for a in (("w0", "w0-a"), ("w1", "w1-a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert committed == {"w0": version + 1, "w1": version + 1}, committed
    w0.versions, w1.versions = [version + 1], [version + 1]
    assert sync_round([w0, w1], [grad, grad]) == [version + 2] * 2
    assert w0.stats()[0]["version"] == version + 2
    w0.close()
    w1.close()


# -- 3. connection flood ------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_connection_flood_does_not_slow_pulls(servers):
    server = servers["keepalive"]
    pid = server.proc.pid
    worker = PSClient([server.target], retry_timeout=0, call_timeout=10)
    worker.attach()
    worker.pull()
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    total, parallel, budget_s = 1000, 50, 30.0
    lock = threading.Lock()
    issued = [0]
    statuses = []
    deadline = time.monotonic() + budget_s

    def flooder():
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= total:
                    return
                issued[0] += 1
            channel = fresh_channel(server.target)
            try:
                statuses.append(health_check(channel, timeout=5))
            except grpc.RpcError as err:
                statuses.append(err.code().name)
            finally:
                channel.close()

    start = time.monotonic()
    threads = [threading.Thread(target=flooder, daemon=True) for _ in range(parallel)]
    for t in threads:
        t.start()
    latencies, during = [], 0
    for _ in range(20):
        t = time.monotonic()
        values = worker.pull()
        latencies.append(time.monotonic() - t)
        during += any(t.is_alive() for t in threads)
        assert values["big"].shape == (BIG_N,)
        time.sleep(0.1)
    for t in threads:
        t.join(budget_s + 10)
    wall = time.monotonic() - start
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= fds_before + 10, 10, 0.2)
    fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    bad = [s for s in statuses if s != "SERVING"]
    print(f"\nflood: {len(statuses)} connections in {wall:.2f}s ({len(statuses) / wall:.0f}/s), "
          f"{len(bad)} not SERVING; {len(latencies)} pulls ({during} during the flood), worst "
          f"{max(latencies) * 1e3:.0f} ms, median {np.median(latencies) * 1e3:.0f} ms; server fds "
          f"{fds_before} -> {fds_after}")
    assert len(statuses) == total and not bad, sorted(set(bad))
    assert wall < 20.0
    assert max(latencies) < 2.0
    assert fds_after <= fds_before + 10  # the flood's connections were closed, not kept
    worker.close()


# -- 4. a shared port ---------------------------------------------------------------------------
def second_server(args, limit: float = 5.0):
    """Run ``radam-ps serve ARGS``: (exit status or None if still running after ``limit``,
    stderr, seconds)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "radam_dist.ps.cli", "serve", "--host", "127.0.0.1",
                             *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=limit)
        return proc.returncode, err, time.monotonic() - t
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        return None, err, time.monotonic() - t


def held_socket(reuseport: bool) -> socket.socket:
    s = socket.socket()
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def assert_refused(status, err, seconds, port):
    lines = [x for x in err.splitlines() if x.startswith("radam-ps serve:")]
    print(f"  exit {status} after {seconds:.2f}s: {lines}")
    assert status == 2, f"exit status {status} after {seconds:.1f}s:\n{err[-3000:]}"
    assert seconds < 5.0
    assert len(lines) == 1, err[-3000:]
    assert str(port) in lines[0] and "port" in lines[0], lines[0]
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.timeout(120)
def test_a_taken_port_is_refused_and_the_first_server_keeps_serving(servers):
    server = servers["stall"]
    port = server.port
    print()
    status, err, seconds = second_server(["--port", str(port)])
    assert_refused(status, err, seconds, port)
    # a port held with SO_REUSEPORT by a process that is not a server
    with held_socket(reuseport=True) as s:
        other = s.getsockname()[1]
        assert_refused(*second_server(["--port", str(other)]), other)
    # a taken --metrics-port (with and without SO_REUSEPORT)
    for reuseport in (False, True):
        with held_socket(reuseport) as s:
            metrics = s.getsockname()[1]
            assert_refused(*second_server(["--port", "0", "--metrics-port", str(metrics)]), metrics)
    # The first server is the only one listening on its port: every new connection reaches it.
    for _ in range(10):
        channel = fresh_channel(server.target)
        try:
            assert health_check(channel, timeout=5) == "SERVING"
        finally:
            channel.close()
    with PSClient([server.target], retry_timeout=0, call_timeout=5) as c:
        stats = c.stats()[0]
    assert sorted(v["name"] for v in stats["variables"]) == sorted(STALL_VALUES)
    assert stats["uptime_s"] > 5


# -- 5. a frozen shard seen by the client -------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_frozen_shard_fails_calls_within_keepalive(servers):
    server = servers["keepalive"]
    pid = server.proc.pid
    client = PSClient([server.target], retry_timeout=0, keepalive_time_s=KA_TIME,
                      keepalive_timeout_s=KA_TIMEOUT)
    client.attach()
    before = client.pull(["small"])
    error, elapsed = None, None
    freeze(pid)
    try:
        t = time.monotonic()
        try:
            client.pull(["small"])
        except grpc.RpcError as err:
            error = err
        elapsed = time.monotonic() - t
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"\nfrozen shard: the pull ended after {elapsed:.2f}s with "
          f"{error.code().name if error is not None else 'success'}")
    assert error is not None, "a pull from a stopped server succeeded"
    assert error.code().name == "UNAVAILABLE", error
    assert elapsed < KA_TIME + KA_TIMEOUT + SLACK
    client.close()
    t = time.monotonic()
    with PSClient([server.target], retry_timeout=15) as again:
        after = again.pull(["small"])
    print(f"after SIGCONT a new client pulled in {time.monotonic() - t:.2f}s")
    np.testing.assert_array_equal(after["small"], before["small"])


# -- 6. a frozen client seen by the server ------------------------------------------------------
FROZEN_CLIENT = r"""
import sys, time
import grpc
from radam_dist.ps.proto import pb, pb_grpc

target, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stub = pb_grpc.ParameterServerStub(grpc.insecure_channel(target))

def requests():
    yield pb.PushRequest(header=pb.PushHeader(worker_id="frozen", base_version=0,
                                              request_id="frozen-1"))
    c = pb.TensorChunk(name="big", role=pb.GRADIENT, dtype="float32", offset=0, data=bytes(chunk))
    c.shape.extend([n])
    yield pb.PushRequest(chunk=c)
    print("sent", flush=True)
    time.sleep(120)

try:
    stub.Push(requests(), timeout=120)
    print("ended OK", flush=True)
except grpc.RpcError as err:
    print("ended", err.code().name, flush=True)
"""


def read_line(proc, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode().strip() if ready else ""


@pytest.mark.timeout(120)
def test_a_frozen_client_is_dropped_and_its_budget_freed(servers):
    server = servers["keepalive"]
    full = {"big": np.ones(BIG_N, np.float32), "small": np.ones(16, np.float32)}
    probe = PSClient([server.target], retry_timeout=0, call_timeout=10)
    probe.attach()

    def whole_budget_push() -> str:
        try:
            probe.push(full)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    assert whole_budget_push() == "OK"  # it fits when nothing else holds the budget
    proc = subprocess.Popen([sys.executable, "-c", FROZEN_CLIENT, server.target, str(BIG_N), str(MiB)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        assert read_line(proc, 30) == "sent", proc.stderr.read1().decode()[-3000:] if proc.poll() else ""
        sent = time.monotonic()
        # the half-sent push holds 4 MiB of the budget: another such push does not fit
        assert wait_for(lambda: whole_budget_push() == "RESOURCE_EXHAUSTED", 5, 0.2)
        # the connection idles (several keepalive rounds, every ping answered), then freezes
        time.sleep(max(0.0, sent + 2 * KA_TIME + 1 - time.monotonic()))
        assert whole_budget_push() == "RESOURCE_EXHAUSTED", "the server let go of a live client"
        freeze(proc.pid)
        stopped = time.monotonic()
        freed = None
        while time.monotonic() < stopped + KA_TIME + KA_TIMEOUT + SLACK + 2:
            if whole_budget_push() == "OK":
                freed = time.monotonic() - stopped
                break
            time.sleep(0.25)
        print(f"\nfrozen client: budget free again {freed if freed is None else round(freed, 2)}s "
              "after SIGSTOP")
        assert freed is not None and freed < KA_TIME + KA_TIMEOUT + SLACK, freed
        os.kill(proc.pid, signal.SIGCONT)
        ended = read_line(proc, 10)
        print(f"the client, resumed, says: {ended!r}; server log names it: "
              f"{'frozen' in server.log()}")
        assert ended.startswith("ended") and ended != "ended OK", ended
    finally:
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        proc.kill()
        proc.wait(30)
        probe.close()


# -- 7. frozen shards under sync training -------------------------------------------------------
def initial():
    rng = np.random.default_rng(5)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def gradient(worker: str, round_: int):
    rng = np.random.default_rng([int(worker[1:]), round_])
    return {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}


def reference(rounds: int, workers=("w0", "w1")):
    """One process: RectifiedAdam on the mean gradient of both workers, round after round."""
    import keras
    import tensorflow as tf

    from radam_dist import RectifiedAdam

    names = sorted(SHAPES)
    values = initial()
    variables = [keras.Variable(values[n], name=n) for n in names]
    opt = RectifiedAdam(**CONFIG)
    for round_ in range(rounds):
        grads = []
        for n in names:
            total = np.zeros(SHAPES[n], np.float32)
            for w in sorted(workers):
                total += gradient(w, round_)[n]
            grads.append(tf.constant(total / np.float32(len(workers))))
        opt.apply_gradients(zip(grads, variables))
    return {n: v.numpy() for n, v in zip(names, variables)}


@pytest.mark.timeout(300)
def test_frozen_shards_under_sync_training_lose_and_repeat_nothing(servers, monkeypatch):
    shards = [servers["shard0"], servers["shard1"]]
    targets = [s.target for s in shards]
    clients = {}
    for w in ("w0", "w1"):
        clients[w] = PSClient(targets, worker_id=w, split_threshold_bytes=SPLIT, retry_timeout=60)
        clients[w].register(initial(), CONFIG)
        clients[w].pull()
    acks = {w: [] for w in clients}
    errors = []
    slowest = {w: 0.0 for w in clients}

    def train(w):
        c = clients[w]
        try:
            for _ in range(ROUNDS):
                round_ = c.versions[0]
                t = time.monotonic()
                version = c.push(gradient(w, round_))
                slowest[w] = max(slowest[w], time.monotonic() - t)
                acks[w].append((round_, version))
        except Exception as err:  # noqa: BLE001
            errors.append((w, repr(err)))

    def done() -> int:
        return min(len(a) for a in acks.values())

    threads = [threading.Thread(target=train, args=(w,), daemon=True) for w in clients]
    start = time.monotonic()
    for t in threads:
        t.start()
    frozen = []
    try:
        assert wait_for(lambda: done() >= 10 or errors, 60), "no training progress"
        for index in (0, 1):
            before = done()
            freeze(shards[index].proc.pid)
            try:
                time.sleep(5)
            finally:
                os.kill(shards[index].proc.pid, signal.SIGCONT)
            during = done() - before
            t = time.monotonic()
            resumed = wait_for(lambda: done() >= min(ROUNDS, before + during + 10) or errors, 60)
            frozen.append((index, before, during, time.monotonic() - t))
            assert resumed and not errors, (errors, acks)
    finally:
        for t in threads:
            t.join(120)
    wall = time.monotonic() - start
    print(f"\nfrozen shards: {done()} rounds in {wall:.1f}s; slowest push "
          f"{max(slowest.values()):.2f}s; " + "; ".join(
              f"shard {i} frozen 5 s at round {b}: {d} rounds during, +10 more in {s:.2f}s"
              for i, b, d, s in frozen))
    assert not errors, errors
    for w, a in acks.items():
        assert a == [(r, r + 1) for r in range(ROUNDS)], (w, a)
    for _, _, during, _ in frozen:
        assert during <= 2  # a frozen shard did stop the rounds (the test froze something)
    states = []
    for s in shards:
        with PSClient([s.target], retry_timeout=30) as c:
            st = c.stats()[0]
        states.append((st["version"], st["step"]))
    assert states == [(ROUNDS, ROUNDS)] * 2, states
    values = clients["w0"].pull()
    expected = reference(ROUNDS)
    for n in SHAPES:
        np.testing.assert_allclose(values[n], expected[n], rtol=1e-6, atol=1e-7, err_msg=n)
    for c in clients.values():
        c.close()
