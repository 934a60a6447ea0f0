"""Prometheus metrics and JSON logs of real `radam-ps serve` processes, scraped over HTTP.

Each test starts a server with ``--metrics-port 0``, does real calls through PSClient (and a
few that the server refuses), then reads ``/metrics`` with urllib and checks that every number
is the one that the calls imply: counts per method and status code, versions, staleness,
timings' sample counts, bytes on the wire, sync-round timeouts, checkpoint and WAL timings.
"""

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ps_helpers import REPO, ServerPool, rpc_code
from radam_dist.ps.client import PSClient, StaleGradientError

TOKEN = "metrics-test-token-0123456789"
N = 1000  # float32 elements: 4000 bytes per tensor, so payload bytes dominate the counters
CONFIG = {"learning_rate": 0.01}


@pytest.fixture
def pool(tmp_path):
    p = ServerPool(tmp_path)
    yield p
    p.close()


def metrics_url(server) -> str:
    """The endpoint the server logged (it was started with --metrics-port 0)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = re.search(r"metrics on http://([^\"\s]+)/metrics", server.log())
        if m:
            return f"http://{m.group(1)}/metrics"
        time.sleep(0.05)
    raise AssertionError("no 'metrics on' line in the log:\n" + server.log())


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape, plus the raw text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    samples["_text"] = text
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def json_log_lines(server):
    return [json.loads(line) for line in server.log_path.read_text().splitlines()
            if line.startswith("{")]


def test_async_counts_refusals_staleness_and_bytes(pool, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    (server,) = pool.start(["--mode", "async", "--max-staleness", "1", "--token-file",
                            str(tmp_path / "token"), "--metrics-port", "0", "--log-format", "json"])
    url = metrics_url(server)
    before = scrape(url)
    assert value(before, "radam_ps_version") == 0
    assert value(before, "radam_ps_requests_total", method="Push", code="OK") == 0

    rng = np.random.default_rng(0)
    lagging = PSClient(server.target, token=TOKEN)
    fresh = PSClient(server.target, token=TOKEN)
    intruder = PSClient(server.target, token="wrong-token", retry_timeout=0)
    try:
        lagging.register({"w": np.zeros(N, np.float32)}, CONFIG)
        fresh.attach()
        for _ in range(3):  # fresh pulls each time: staleness 0, applied
            fresh.pull()
            fresh.push({"w": rng.normal(size=N).astype(np.float32)})
        with pytest.raises(StaleGradientError):  # computed at version 0, server at 3 > 1
            lagging.push({"w": rng.normal(size=N).astype(np.float32)})
        with pytest.raises(grpc.RpcError) as err:
            intruder.stats()
        assert rpc_code(err) == "UNAUTHENTICATED"
        stats = fresh.stats()[0]
    finally:
        for c in (lagging, fresh, intruder):
            c.close()

    after = scrape(url)
    assert value(after, "radam_ps_requests_total", method="Push", code="OK") == 3
    assert value(after, "radam_ps_requests_total", method="Push", code="ABORTED") == 1
    assert value(after, "radam_ps_requests_total", method="Stats", code="UNAUTHENTICATED") == 1
    assert value(after, "radam_ps_requests_total", method="Register", code="OK") == 1  # attach reads Stats
    assert value(after, "radam_ps_requests_total", method="Pull", code="OK") == 3
    assert stats["pushes_applied"] == 3 and stats["pushes_refused"] == 1
    assert value(after, "radam_ps_version") == stats["version"] == 3
    assert value(after, "radam_ps_step") == stats["step"] == 3
    # staleness: three pushes at 0, the refused one at 3
    assert value(after, "radam_ps_staleness_count") == 4
    assert value(after, "radam_ps_staleness_sum") == 3
    assert value(after, "radam_ps_staleness_bucket", le="0.0") == 3
    assert value(after, "radam_ps_staleness_bucket", le="2.0") == 3
    assert value(after, "radam_ps_staleness_bucket", le="3.0") == 4
    assert value(after, "radam_ps_push_seconds_count", method="Push") == 3  # not the refused one
    assert value(after, "radam_ps_apply_seconds_count") == 3
    assert value(after, "radam_ps_push_seconds_sum", method="Push") > 0
    assert value(after, "radam_ps_sync_round_timeouts_total") == 0
    assert value(after, "radam_ps_wal_fsync_seconds_count") == 0  # no --wal
    # Received: the registration's w and 4 pushes, 4000 bytes each; sent: 3 pulls of 4000
    # bytes. Headers, Stats calls and protobuf framing add a little.
    payload_in = 4 * N + 4 * 4 * N
    received = value(after, "radam_ps_bytes_received_total")
    assert payload_in <= received <= payload_in + 4096, received
    sent = value(after, "radam_ps_bytes_sent_total")
    assert 3 * 4 * N <= sent <= 3 * 4 * N + 4096, sent
    assert value(after, "radam_ps_shard_info", mode="async", shard_index="0", num_shards="1") == 1
    assert "process_resident_memory_bytes" in after["_text"]

    # The refusals are in the JSON log, with method, code and the server's reason.
    lines = json_log_lines(server)
    refused = {(r.get("method"), r.get("code")): r for r in lines if r["message"].startswith("refused")}
    assert ("Push", "ABORTED") in refused and "stale gradients" in refused[("Push", "ABORTED")]["details"]
    assert ("Stats", "UNAUTHENTICATED") in refused
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in lines)


def test_sync_timeout_wal_and_checkpoint(pool, tmp_path):
    (server,) = pool.start(["--mode", "sync", "--num-workers", "2", "--sync-timeout", "1",
                            "--checkpoint-dir", str(tmp_path / "ckpt"), "--wal",
                            "--checkpoint-interval", "0", "--metrics-port", "0"])
    url = metrics_url(server)
    a = PSClient(server.target, worker_id="a", retry_timeout=5)
    b = PSClient(server.target, worker_id="b", retry_timeout=5)
    try:
        a.register({"w": np.zeros(N, np.float32)}, CONFIG)
        b.attach()
        with pytest.raises(grpc.RpcError) as err:  # b never comes: the round is abandoned
            a.push({"w": np.ones(N, np.float32)})
        assert rpc_code(err) == "DEADLINE_EXCEEDED"
        mid = scrape(url)
        assert value(mid, "radam_ps_sync_round_timeouts_total") == 1
        assert value(mid, "radam_ps_version") == 0
        assert value(mid, "radam_ps_apply_seconds_count") == 0

        results = {}
        threads = [threading.Thread(target=lambda c=c: results.setdefault(c.worker_id, c.push(
            {"w": np.ones(N, np.float32)}))) for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {"a": 1, "b": 1}
        a.save_checkpoint()
    finally:
        a.close()
        b.close()
    after = scrape(url)

    def calls(code, method=None):
        return sum(v for k, v in after.items() if k != "_text" and k[0] == "radam_ps_requests_total"
                   and ("code", code) in k[1] and (method is None or ("method", method) in k[1]))

    assert value(after, "radam_ps_sync_round_timeouts_total") == 1
    assert calls("DEADLINE_EXCEEDED") == 1  # the one abandoned round, on whichever call waited
    assert calls("OK", "SaveCheckpoint") == 1
    assert value(after, "radam_ps_version") == 1 and value(after, "radam_ps_step") == 1
    assert value(after, "radam_ps_apply_seconds_count") == 1  # one round, one step
    # --wal: one fsync'ed record per staged push (3: a's lonely one, then a's and b's) and one
    # per applied round.
    staged = calls("OK", "Push") + calls("OK", "PushPull")
    assert staged == 3
    assert value(after, "radam_ps_wal_fsync_seconds_count") == staged + 1
    assert value(after, "radam_ps_checkpoint_seconds_count") == 1
    assert value(after, "radam_ps_checkpoint_seconds_sum") > 0
    assert value(after, "radam_ps_staleness_count") == 0  # sync mode: not observed
    timed = sum(v for k, v in after.items() if k != "_text" and k[0] == "radam_ps_push_seconds_count")
    assert timed == calls("OK", "Push") + calls("OK", "CommitRound") + calls("OK", "ApplyRound")
    # The timeout is logged (text format here) with its reason.
    assert re.search(r"refused \w+ .*DEADLINE_EXCEEDED sync round 0 timed out", server.log())


def test_placeholder_token_is_refused(tmp_path):
    (tmp_path / "token").write_text("REPLACE-WITH-A-LONG-RANDOM-TOKEN\n")
    for extra_env, args in (({}, ["--token-file", str(tmp_path / "token")]),
                            ({"RADAM_PS_TOKEN": "REPLACE"}, [])):
        proc = subprocess.run(
            [sys.executable, "-m", "radam_dist.ps.cli", "serve", "--port", "0", *args],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**__import__("os").environ, **extra_env})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "placeholder" in proc.stderr


def test_metrics_registries_are_per_server():
    from prometheus_client import REGISTRY
    from radam_dist.ps.metrics import PSMetrics

    one, two = PSMetrics(lambda: (5, 7)), PSMetrics(lambda: (1, 1))
    one.requests.labels("Push", "OK").inc()
    assert one.registry.get_sample_value("radam_ps_requests_total", {"method": "Push", "code": "OK"}) == 1
    assert two.registry.get_sample_value("radam_ps_requests_total", {"method": "Push", "code": "OK"}) is None
    assert one.registry.get_sample_value("radam_ps_version") == 5
    assert REGISTRY.get_sample_value("radam_ps_version") is None


REQUIRED = ("radam_ps_requests_total", "radam_ps_push_seconds", "radam_ps_apply_seconds",
            "radam_ps_version", "radam_ps_step", "radam_ps_staleness",
            "radam_ps_bytes_received_total", "radam_ps_bytes_sent_total",
            "radam_ps_sync_round_timeouts_total", "radam_ps_checkpoint_seconds",
            "radam_ps_wal_fsync_seconds")


def test_grafana_dashboard_uses_exported_metrics():
    """Every series the dashboard queries exists, and every required metric has a panel."""
    from prometheus_client import generate_latest
    from radam_dist.ps.metrics import PSMetrics

    metrics = PSMetrics(lambda: (0, 0))
    metrics.requests.labels("Push", "OK").inc()  # labelled series appear with their first value
    metrics.push_seconds.labels("Push").observe(0.1)
    exported = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        exported.update(s.name for s in family.samples)
    dashboard = json.loads((REPO / "deploy" / "ps" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set()
    for expr in exprs:
        used.update(n for n in re.findall(r"\b((?:radam_ps|process)_[a-z_]+)\b", expr))
    assert used and used <= exported, used - exported
    for name in REQUIRED:
        assert any(u == name or u.startswith(name + "_") for u in used), f"no panel for {name}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_refusal_logs_are_rate_limited(caplog):
    """A client hammering with a wrong token cannot flood the log; the counter counts all."""
    from radam_dist.ps import metrics as metrics_mod

    class Context:
        def details(self):
            return "invalid bearer token"

        def peer(self):
            return "ipv4:127.0.0.1:1"

    m = metrics_mod.PSMetrics()
    with caplog.at_level("INFO", logger="radam_dist.ps.metrics"):
        for _ in range(metrics_mod.LOG_PER_WINDOW + 30):
            m._record("Stats", "UNAUTHENTICATED", 0.0, Context())
        m._record("Push", "ABORTED", 0.0, Context())  # another (method, code): its own budget
    lines = [r for r in caplog.records if r.name == "radam_dist.ps.metrics"]
    assert len([r for r in lines if r.code == "UNAUTHENTICATED"]) == metrics_mod.LOG_PER_WINDOW
    assert len([r for r in lines if r.code == "ABORTED"]) == 1
    assert m.registry.get_sample_value(
        "radam_ps_requests_total", {"method": "Stats", "code": "UNAUTHENTICATED"}) == metrics_mod.LOG_PER_WINDOW + 30
    # The next window's first line says how many were left out.
    key = ("Stats", "UNAUTHENTICATED")
    start, logged, skipped = m._log_windows[key]
    m._log_windows[key] = (start - metrics_mod.LOG_WINDOW_S, logged, skipped)
    caplog.clear()
    with caplog.at_level("INFO", logger="radam_dist.ps.metrics"):
        m._record("Stats", "UNAUTHENTICATED", 0.0, Context())
    (line,) = [r for r in caplog.records if r.name == "radam_dist.ps.metrics"]
    assert line.suppressed == 30 and "30 more like it" in line.getMessage()
