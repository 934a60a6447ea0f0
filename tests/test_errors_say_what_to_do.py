"""Errors that say what to do, at once (issue 24, item 3), against real processes.

TLS, token and config mistakes give one line naming the argument or flag to fix, within a
second or two (no retry loop, no traceback from a CLI); refusals come before TensorFlow
loads; a shard outage is logged once when it starts and once when it ends; a TF_CONFIG peer
that never arrives makes ``strategy_from_environment`` give up after $RADAM_DIST_PEER_TIMEOUT,
and SIGTERM ends the wait.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from ps_helpers import REPO, ServerPool
from radam_dist.launch.cluster import free_loopback_ports
from radam_dist.ps.client import AuthenticationError, PSClient, TLSMismatchError

TOKEN = "token-for-the-error-tests"
CLI = [sys.executable, "-m", "radam_dist.ps.cli"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", RADAM_PS_TOKEN="")


def _stderr_lines(text: str):
    """stderr without TensorFlow / gRPC C++ log noise."""
    return [line for line in text.splitlines() if line.strip()
            and not line.startswith(("I0000", "W0000", "E0000", "WARNING: All log messages"))]


@pytest.fixture(scope="module")
def tls_shard(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    from test_ps_security import make_pki

    d = tmp_path_factory.mktemp("errors")
    pki = make_pki(d)
    (d / "token").write_text(TOKEN + "\n")
    pool = ServerPool(d)
    try:
        tls, plain = pool.start(
            ["--token-file", str(d / "token"), "--tls-cert", str(pki / "server.pem"),
             "--tls-key", str(pki / "server.key")],
            ["--token-file", str(d / "token")], env={"RADAM_PS_TOKEN": ""})
        yield tls, plain, pki, d
    finally:
        pool.close()


@pytest.mark.timeout(120)
def test_plaintext_client_against_tls_shard_fails_at_once_naming_root_certificates(tls_shard):
    tls, plain, pki, _ = tls_shard
    start = time.monotonic()
    with pytest.raises(TLSMismatchError) as excinfo:  # retry_timeout stays at its 60 s default
        PSClient([tls.target], token=TOKEN).stats()
    assert time.monotonic() - start < 5
    message = str(excinfo.value)
    assert "TLS" in message and "root_certificates" in message and "\n" not in message
    assert isinstance(excinfo.value, grpc.RpcError)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE
    start = time.monotonic()  # and the other way round: TLS against a plaintext shard
    with pytest.raises(TLSMismatchError) as excinfo:
        PSClient([plain.target], token=TOKEN, root_certificates=pki / "ca.pem").stats()
    assert time.monotonic() - start < 5
    assert "does not speak TLS" in str(excinfo.value)


@pytest.mark.timeout(120)
def test_wrong_or_missing_token_names_the_token(tls_shard):
    tls, _, pki, _ = tls_shard
    for token, says in (("wrong", "refused the bearer token"), (None, "needs a bearer token")):
        with pytest.raises(AuthenticationError) as excinfo:
            PSClient([tls.target], token=token, root_certificates=pki / "ca.pem").stats()
        message = str(excinfo.value)
        assert says in message and "PSClient(token=...)" in message
        assert "_InactiveRpcError" not in message and "\n" not in message
        assert excinfo.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert PSClient([tls.target], token=TOKEN, root_certificates=pki / "ca.pem").stats()


@pytest.mark.timeout(120)
def test_stats_cli_mistakes_are_one_line_naming_the_flag(tls_shard):
    tls, _, pki, d = tls_shard
    cases = [
        (["stats", tls.target, "--tls-ca", str(pki / "ca.pem")], 2, "--token-file"),
        (["stats", tls.target, "--token-file", str(d / "token")], 2, "--tls-ca"),
        (["stats", tls.target, "--tls-ca", str(d / "missing.pem")], 2, "--tls-ca"),
        (["stats", "127.0.0.1:1"], 1, "UNAVAILABLE"),
    ]
    for args, code, flag in cases:
        start = time.monotonic()
        done = subprocess.run(CLI + args, capture_output=True, text=True, env=ENV, timeout=60)
        took = time.monotonic() - start
        lines = _stderr_lines(done.stderr)
        assert done.returncode == code, (args, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert len([line for line in lines if not line.startswith("usage:")]) == 1, lines
        assert flag in lines[-1], (args, lines)
        assert took < 4, f"{args}: {took:.1f} s (TensorFlow loaded?)"
    ok = subprocess.run(CLI + ["stats", tls.target, "--tls-ca", str(pki / "ca.pem"),
                               "--token-file", str(d / "token")],
                        capture_output=True, text=True, env=ENV, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout)["mode"] == "async", ok.stderr


def test_register_with_a_bad_learning_rate_says_so():
    # Two shards, one variable: the learning rate is named, not "shards [1] would hold no
    # variable". Nothing is sent, so no server is needed.
    client = PSClient(["127.0.0.1:1", "127.0.0.1:2"], retry_timeout=0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="learning_rate") as excinfo:
            client.register({"w": np.ones(4, np.float32)}, {"learning_rate": bad})
        assert "would hold no variable" not in str(excinfo.value)
    with pytest.raises(ValueError, match="fewer targets"):
        client.register({"w": np.ones(4, np.float32)}, {"learning_rate": 0.1})
    client.close()


@pytest.mark.timeout(60)
def test_serve_refuses_an_unusable_checkpoint_dir_before_tensorflow(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    start = time.monotonic()
    done = subprocess.run(CLI + ["serve", "--port", "0", "--checkpoint-dir", str(blocker / "ckpt")],
                          capture_output=True, text=True, env=ENV, timeout=60)
    took = time.monotonic() - start
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--checkpoint-dir" in _stderr_lines(done.stderr)[-1]
    assert took < 4, f"{took:.1f} s: TensorFlow loaded first"


@pytest.mark.timeout(180)
def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(tmp_path, caplog):
    pool = ServerPool(tmp_path)
    try:
        (server,) = pool.start(["--mode", "async"], env={"RADAM_PS_TOKEN": ""})
        client = PSClient([server.target], retry_timeout=120)
        client.register({"w": np.ones(4, np.float32)}, {"learning_rate": 0.1})
        server.kill()
        server.proc.wait(30)

        def restart():
            time.sleep(3)
            server.start(wait=False)

        threading.Thread(target=restart, daemon=True).start()
        caplog.set_level(logging.DEBUG, logger="radam_dist.ps.client")
        start = time.monotonic()
        client.stats()  # retries through the outage (3 s down + the restart)
        took = time.monotonic() - start
        records = [r for r in caplog.records if r.name == "radam_dist.ps.client"
                   and r.levelno >= logging.WARNING]
        began = [r for r in records if "unreachable" in r.getMessage()]
        ended = [r for r in records if "reachable again" in r.getMessage()]
        assert len(began) == 1 and len(ended) == 1, [r.getMessage() for r in records]
        assert len(records) == 2, [r.getMessage() for r in records]
        seconds = float(ended[0].getMessage().split("outage of ")[1].split(" s")[0])
        assert 3 <= seconds <= took + 0.5
        client.stats()  # healthy again: nothing more logged
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING
                    and r.name == "radam_dist.ps.client"]) == 2
        client.close()
    finally:
        pool.close()


def _worker_config(index: int, ports):
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


PEER_SCRIPT = ("import sys, time; from radam_dist.distribute import strategy_from_environment\n"
               "try:\n"
               "    strategy_from_environment()\n"
               "except Exception as err:\n"
               "    print(type(err).__name__, err, 'tensorflow' in sys.modules, flush=True)\n"
               "    sys.exit(3)\n"
               "print('strategy made', flush=True)\n")


@pytest.mark.timeout(60)
def test_a_peer_that_never_arrives_gives_up_after_the_peer_timeout():
    ports = free_loopback_ports(2)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", PEER_SCRIPT], capture_output=True, text=True,
                          cwd=REPO, timeout=50, env=dict(ENV, TF_CONFIG=_worker_config(1, ports),
                                                         RADAM_DIST_PEER_TIMEOUT="2"))
    took = time.monotonic() - start
    assert done.returncode == 3, done.stdout + done.stderr
    line = done.stdout.strip()
    assert line.startswith("PeersMissingError") and f"worker:0 (127.0.0.1:{ports[0]})" in line
    assert "RADAM_DIST_PEER_TIMEOUT" in line and line.endswith("False"), line  # before TF
    assert 2 <= took < 10, took


@pytest.mark.timeout(60)
def test_sigterm_ends_the_wait_for_a_peer():
    ports = free_loopback_ports(2)
    proc = subprocess.Popen([sys.executable, "-c", PEER_SCRIPT], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(ENV, TF_CONFIG=_worker_config(0, ports),
                                     RADAM_DIST_PEER_TIMEOUT="0"))
    try:
        deadline = time.monotonic() + 30
        while True:  # waiting: it answers at its own TF_CONFIG port
            try:
                socket.create_connection(("127.0.0.1", ports[0]), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        time.sleep(1.0)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
        assert time.monotonic() - start < 3
    finally:
        proc.kill()
        proc.wait()


def test_a_bad_tf_config_is_refused_before_tensorflow():
    script = ("import sys; from radam_dist.distribute import strategy_from_environment\n"
              "try:\n    strategy_from_environment()\n"
              "except ValueError as err:\n    print(err, 'tensorflow' in sys.modules)\n")
    for config, says in (('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", '
                          '"index": 3}}', "task worker:3 is not in its cluster"),
                         ("{cluster: ", "TF_CONFIG is not JSON")):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              cwd=REPO, timeout=60, env=dict(ENV, TF_CONFIG=config))
        assert says in done.stdout and done.stdout.strip().endswith("False"), done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=60, env=dict(ENV, RADAM_DIST_PEER_TIMEOUT="soon",
                                               TF_CONFIG=_worker_config(0, [1, 2])))
    assert "RADAM_DIST_PEER_TIMEOUT" in done.stdout, done.stdout + done.stderr


@pytest.mark.timeout(180)
def test_two_workers_meet_and_build_their_strategy():
    """The rendezvous hands each port over to TensorFlow: MWMS still forms."""
    script = ("from radam_dist.distribute import strategy_from_environment\n"
              "s = strategy_from_environment()\n"
              "print('replicas', s.num_replicas_in_sync, flush=True)\n")
    done = subprocess.run([sys.executable, "-m", "radam_dist.cli", "launch", "--workers", "2",
                           "--peer-timeout", "120", "--", sys.executable, "-c", script],
                          capture_output=True, text=True, cwd=REPO, timeout=170, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[worker:0] replicas 2" in done.stdout and "[worker:1] replicas 2" in done.stdout
