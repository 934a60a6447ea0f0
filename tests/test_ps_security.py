"""Bearer tokens, TLS and mutual TLS against real server processes.

An unauthenticated or wrongly authenticated call gets UNAUTHENTICATED and changes nothing;
the health service answers without a token (Kubernetes probes); plaintext on a non-loopback
address is refused unless --insecure is given.
"""

import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps_helpers import REPO, ServerPool, rpc_code
from radam_dist.ps.client import PSClient

TOKEN = "s3cret-token-for-tests"
VALUES = {"w": np.ones((4,), np.float32)}
CONFIG = {"learning_rate": 0.1}

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=radam-ps test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=radam-ps-{name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("security")
    pki = make_pki(d)
    (d / "token").write_text(TOKEN + "\n")
    pool = ServerPool(d)
    try:
        servers = pool.start(
            ["--mode", "async"],  # token from the environment
            ["--mode", "async", "--token-file", str(d / "token"),
             "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")],
            ["--mode", "async", "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
             "--tls-client-ca", str(pki / "ca.pem")],
            envs=[{"RADAM_PS_TOKEN": TOKEN}, {"RADAM_PS_TOKEN": ""}, {"RADAM_PS_TOKEN": ""}])
        yield servers, pki
    finally:
        pool.close()


@pytest.mark.timeout(120)
def test_token_required_and_refusal_changes_nothing(cluster):
    (plain, _, _), _ = cluster
    good = PSClient([plain.target], token=TOKEN)
    good.register(VALUES, CONFIG)
    good.push({"w": np.ones(4, np.float32)})
    before = good.pull()["w"]
    for token in (None, "wrong-token", TOKEN + "x"):
        bad = PSClient([plain.target], token=token, retry_timeout=0, validate=False)
        bad.placement, bad._specs = good.placement, good._specs
        for call in (lambda: bad.push({"w": np.ones(4, np.float32)}),
                     lambda: bad.register(VALUES, {"learning_rate": 0.9}),
                     lambda: bad.pull(), lambda: bad.stats(), lambda: bad.save_checkpoint()):
            with pytest.raises(grpc.RpcError) as excinfo:
                call()
            assert rpc_code(excinfo) == "UNAUTHENTICATED"
    np.testing.assert_array_equal(good.pull()["w"], before)
    stats = good.stats()[0]
    assert stats["version"] == 1 and stats["pushes_refused"] == 0
    # The health service stays open for probes.
    with grpc.insecure_channel(plain.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(
            service="radam_dist.ps.v1.ParameterServer"), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.timeout(120)
def test_tls_with_token_file(cluster):
    (_, tls, _), pki = cluster
    client = PSClient([tls.target], token=TOKEN, root_certificates=pki / "ca.pem")
    client.register(VALUES, CONFIG)
    assert client.push({"w": np.ones(4, np.float32)}) == 1
    with pytest.raises(grpc.RpcError) as excinfo:  # TLS but no token
        PSClient([tls.target], root_certificates=pki / "ca.pem", retry_timeout=0).stats()
    assert rpc_code(excinfo) == "UNAUTHENTICATED"
    with pytest.raises(grpc.RpcError) as excinfo:  # plaintext against a TLS port
        PSClient([tls.target], token=TOKEN, retry_timeout=0, call_timeout=10).stats()
    assert rpc_code(excinfo) == "UNAVAILABLE"
    assert client.stats()[0]["version"] == 1
    with pytest.raises(grpc.RpcError):  # a wrong token: refused, logged once, never echoed
        PSClient([tls.target], token="wrong-" + TOKEN, root_certificates=pki / "ca.pem",
                 retry_timeout=0).stats()
    deadline = time.monotonic() + 10
    while "refused Stats" not in tls.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    refused = [line for line in tls.log().splitlines() if "refused Stats" in line]
    assert refused and all("UNAUTHENTICATED" in line for line in refused)
    assert TOKEN not in tls.log()


@pytest.mark.timeout(120)
def test_mutual_tls(cluster):
    (_, _, mtls), pki = cluster
    client = PSClient([mtls.target], root_certificates=pki / "ca.pem",
                      client_cert=pki / "client.pem", client_key=pki / "client.key")
    client.register(VALUES, CONFIG)
    assert client.push({"w": np.ones(4, np.float32)}) == 1
    with pytest.raises(grpc.RpcError) as excinfo:  # no client certificate
        PSClient([mtls.target], root_certificates=pki / "ca.pem", retry_timeout=0, call_timeout=10).stats()
    assert rpc_code(excinfo) == "UNAVAILABLE"
    assert client.stats()[0]["version"] == 1


@pytest.mark.timeout(120)
def test_plaintext_off_loopback_needs_insecure():
    done = subprocess.run([sys.executable, "-m", "radam_dist.ps.cli", "serve", "--host", "0.0.0.0",
                           "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 2
    assert "refusing to serve without TLS" in done.stderr and "--insecure" in done.stderr


@pytest.mark.timeout(120)
def test_stats_cli_presents_a_client_certificate(cluster):
    (_, _, mtls), pki = cluster
    cli = [sys.executable, "-m", "radam_dist.ps.cli", "stats", mtls.target, "--tls-ca", str(pki / "ca.pem")]
    done = subprocess.run(cli + ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")],
                          cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"mode": "async"' in done.stdout
    refused = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert refused.returncode != 0  # without the client certificate the handshake fails


@pytest.mark.timeout(180)
def test_broken_tls_files_are_named_at_start(tmp_path, cluster):
    _, pki = cluster
    placeholder = tmp_path / "placeholder.pem"
    placeholder.write_text("REPLACE-WITH-THE-SERVER-CERTIFICATE\n")
    serve = [sys.executable, "-m", "radam_dist.ps.cli", "serve", "--port", "0"]
    cases = [
        (["--tls-cert", str(placeholder), "--tls-key", str(pki / "server.key")],
         f"--tls-cert {placeholder}: not a PEM certificate"),
        (["--tls-cert", str(pki / "server.pem"), "--tls-key", str(tmp_path / "missing.key")],
         "missing.key: no such file"),
        (["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "client.key")],
         "do not load or do not belong together"),
    ]
    for args, text in cases:
        started = time.monotonic()
        done = subprocess.run(serve + args, cwd=REPO, capture_output=True, text=True, timeout=150)
        seconds = time.monotonic() - started
        assert done.returncode == 2, done.stderr[-2000:]
        assert text in done.stderr and "Failed to bind" not in done.stderr, done.stderr[-2000:]
        # Refused before TensorFlow is imported (that import alone takes seconds); the bound is
        # generous for a loaded CI machine, the sys.modules check below is the exact one.
        assert seconds < 5, f"took {seconds:.1f} s to refuse: {done.stderr[-2000:]}"
    # In one process: the refusal comes from the CLI's own checks, with neither TensorFlow nor
    # grpc imported.
    probe = ("import sys; from radam_dist.ps.cli import main; "
             f"rc = main(['serve', '--port', '0', '--tls-cert', {str(placeholder)!r}, "
             f"'--tls-key', {str(pki / 'server.key')!r}]); "
             "print(rc, 'tensorflow' in sys.modules, 'grpc' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=150)
    assert done.stdout.split() == ["2", "False", "False"], (done.stdout, done.stderr[-2000:])
    assert f"--tls-cert {placeholder}: not a PEM certificate" in done.stderr


@pytest.mark.timeout(120)
def test_serve_argument_errors_are_refused_before_tensorflow():
    """Every pure-argument error ends `radam-ps serve` with status 2 and a message naming the
    flag, in one process that never imported TensorFlow or grpc (so it answers at once)."""
    cases = [
        (["--port", "70000"], "--port 70000 is not a port number"),
        (["--max-threads", "0"], "--max-threads must be >= 1"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
        (["--max-staleness", "-2"], "--max-staleness must be >= -1"),
        (["--checkpoint-interval", "-1"], "--checkpoint-interval must be >= 0"),
        (["--sync-timeout", "0"], "--sync-timeout must be > 0"),
        (["--max-request-bytes", "0"], "--max-request-bytes must be >= 1"),
        (["--wal"], "--wal needs --checkpoint-dir"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--num-shards", "2", "--shard-index", "2"], "--shard-index 2 is not in [0, --num-shards 2)"),
        (["--reserved-threads", "64"], "--reserved-threads must be in [0, --max-threads 64)"),
        (["--mode", "sync", "--num-workers", "60"],
         "--max-threads minus --reserved-threads must exceed --num-workers"),
        (["--stream-idle-timeout", "-1"], "--stream-idle-timeout must be >= 0"),
        (["--keepalive-time", "0"], "--keepalive-time must be > 0"),
        (["--wal-mark-interval", "-0.5"], "--wal-mark-interval must be >= 0"),
    ]
    script = ("import json, sys\nfrom radam_dist.ps.cli import main\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    try:\n        code = main(['serve', '--port', '0', *args])\n"
              "    except SystemExit as exit:\n        code = exit.code\n"
              "    print(code, file=sys.stderr)\n    print('END', file=sys.stderr)\n"
              "print('tensorflow' in sys.modules, 'grpc' in sys.modules)\n")
    import json

    done = subprocess.run([sys.executable, "-c", script, json.dumps([a for a, _ in cases])],
                          cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.stdout.split() == ["False", "False"], (done.stdout, done.stderr[-2000:])
    outputs = done.stderr.split("END\n")[:-1]
    assert len(outputs) == len(cases), done.stderr
    for (args, text), output in zip(cases, outputs):
        assert output.rstrip().endswith("\n2") and text in output, (args, output)
