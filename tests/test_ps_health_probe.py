"""``radam-ps health HOST:PORT``: the probe Docker's HEALTHCHECK and Kubernetes exec probes run,
against real TLS and mutual-TLS servers; exit 0 only when the shard answers SERVING."""

import shutil
import subprocess
import sys

import pytest

from ps_helpers import REPO, ServerPool

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

# Runs the CLI as `radam-ps health ...` does, then reports whether TensorFlow got imported.
PROBE = ("import runpy, sys; sys.argv = ['radam-ps'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('radam_dist.ps.cli', run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code\n"
         "print('TF' if 'tensorflow' in sys.modules else 'NO-TF', file=sys.stderr); sys.exit(code)")


def health(*args):
    done = subprocess.run([sys.executable, "-c", PROBE, "health", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert "NO-TF" in done.stderr, done.stderr  # a probe must stay cheap
    return done.returncode, done.stdout.strip(), done.stderr


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from test_ps_security import make_pki

    d = tmp_path_factory.mktemp("health")
    pki = make_pki(d)
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    pool = ServerPool(d)
    try:
        yield pool.start(["--mode", "async"], tls, tls + ["--tls-client-ca", str(pki / "ca.pem")]), pki
    finally:
        pool.close()


@pytest.mark.timeout(240)
def test_health_plaintext_tls_and_mutual_tls(servers):
    (plain, tls, mtls), pki = servers
    ca, cert, key = str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")

    assert health(plain.target)[:2] == (0, "SERVING")
    assert health(plain.target, "--service", "radam_dist.ps.v1.ParameterServer")[:2] == (0, "SERVING")
    code, _, err = health(plain.target, "--service", "no.such.Service")
    assert code == 1 and "NOT_FOUND" in err

    assert health(tls.target, "--tls-ca", ca)[:2] == (0, "SERVING")
    assert health(f"localhost:{tls.port}", "--tls-ca", ca)[:2] == (0, "SERVING")
    code, _, err = health(tls.target, "--timeout", "3")  # plaintext against a TLS port
    assert code == 1 and ("UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err), err
    code, _, err = health(tls.target, "--tls-ca", ca, "--tls-server-name", "not-in-the-cert",
                          "--timeout", "3")
    assert code == 1, err

    code, _, err = health(mtls.target, "--tls-ca", ca, "--timeout", "3")  # no client certificate
    assert code == 1, err
    assert health(mtls.target, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key)[:2] == (0, "SERVING")


def test_health_argument_errors():
    code, _, err = health("127.0.0.1:1", "--tls-cert", "x.pem")
    assert code == 2 and "--tls-cert and --tls-key go together" in err


def test_health_of_nothing_listening_fails_fast():
    import socket

    with socket.socket() as s:  # a port that nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        code, _, err = health(f"127.0.0.1:{s.getsockname()[1]}", "--timeout", "2")
    assert code == 1 and ("UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err), err
