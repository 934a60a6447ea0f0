"""Bearer tokens, TLS and mutual TLS against real server processes.

An unauthenticated or wrongly authenticated call gets UNAUTHENTICATED and changes nothing;
the health service answers without a token (Kubernetes probes); plaintext on a non-loopback
address is refused unless --insecure is given.
"""

import shutil
import subprocess
import sys

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
