"""The support matrix (issue 24): per (Python, TensorFlow) pair, the built wheel with [ps] in a clean
venv beside that TensorFlow, tested from outside the checkout.

    make matrix                       # every pair (hours; one pair at a time)
    make matrix-ci                    # the CI diagonal: every TF minor and every Python once
    .venv/bin/nox -s "pair(3.12-2.18)"                       # one pair (.venv/bin/nox -l lists them)
    MATRIX_TESTS=quick .venv/bin/nox -s ...                  # a shorter test subset (ci: shorter still)

What one pair does:
1. the wheel is built once per nox run (``python -m build --wheel --no-isolation`` on a copy of the
   checkout, with this interpreter's setuptools and grpcio-tools, like tests/test_packaging.py);
2. a fresh venv under .venv-matrix/ (git-ignored) from that Python, then one ``pip install`` of
   the wheel with [ps], the pinned TensorFlow, the pair's extra pins, and pytest;
3. tests/, pytest.ini, deploy/ and examples/ are copied to a folder outside the checkout and the
   selected test files run there with the venv's interpreter; the session first checks that
   ``radam_dist`` is the installed wheel. ``pip freeze`` and the test log stay in .venv-matrix/.

Interpreters: ``pythonX.Y`` on PATH, else pyenv's newest X.Y (pyenv shims refuse a version that
is not selected, so pyenv is asked directly).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nox

REPO = Path(__file__).resolve().parent
WORK = REPO / ".venv-matrix"
nox.options.sessions = ["pair"]
nox.options.default_venv_backend = "none"  # each pair builds its own venv from scratch (below)
nox.options.error_on_missing_interpreters = True

# The TensorFlow each pair pins (the newest patch of each minor) and the Pythons it has wheels for.
TENSORFLOW = {
    "2.16": ("tensorflow-cpu==2.16.2", ("3.10", "3.11", "3.12")),
    "2.17": ("tensorflow-cpu==2.17.1", ("3.10", "3.11", "3.12")),
    "2.18": ("tensorflow-cpu==2.18.1", ("3.10", "3.11", "3.12")),
    "2.19": ("tensorflow-cpu==2.19.1", ("3.10", "3.11", "3.12")),
    "2.20": ("tensorflow-cpu==2.20.0", ("3.10", "3.11", "3.12", "3.13")),
    "2.21": ("tensorflow-cpu==2.21.0", ("3.10", "3.11", "3.12", "3.13")),
}
# TF 2.16 pairs run the [ps] floors (pyproject.toml / radam_dist/_requirements.py); the others take
# what pip resolves beside their TensorFlow (protobuf 5.x for 2.18/2.19, 7.x for 2.20/2.21).
FLOORS = ["grpcio==1.63.0", "grpcio-health-checking==1.62.3", "protobuf==4.25.0",
          "prometheus-client==0.26.0"]
EXTRA_PINS = {"2.16": FLOORS}
TEST_TOOLS = ["pytest==8.4.2", "pytest-timeout==2.4.0", "pytest-xdist==3.8.0", "pyyaml==6.0.4"]

# The files each pair runs (issue 24: core, strategy, state layouts, parameter server).
# test_ps_protogen.py needs a source checkout (it regenerates stubs), so it is not among them.
GROUPS = {
    "core": ["test_core_api.py", "test_core_serialization.py", "test_core_training.py",
             "test_tfa_reference.py"],
    "strategy": ["test_distribute_strategies.py"],
    "state": ["test_state_layouts.py"],
    "ps": sorted(Path(p).name for p in glob.glob(str(REPO / "tests" / "test_ps_*.py"))
                 if not p.endswith("test_ps_protogen.py")),
}
# A shorter subset (MATRIX_TESTS=quick): the core API and serialization files (Keras and TF
# versions), the tfa reference trajectories, MirroredStrategy, and the PS files that cover the
# stubs, the wire and a Keras worker on the pair's protobuf and grpcio. About 3.2 min of tests
# per pair with two pytest workers on the 2-core machine.
QUICK = ["test_core_api.py", "test_core_serialization.py", "test_tfa_reference.py",
         "test_distribute_strategies.py::test_mirrored_two_logical_cpus",
         "test_ps_wire.py", "test_ps_keras.py"]
# What CI's diagonal runs per pair (MATRIX_TESTS=ci): six pairs have to fit beside `make test`
# in .ci/run, so the Keras API, .keras / checkpoint round trips, the tfa trajectories and the
# stubs on the wire; QUICK's MirroredStrategy and Keras-worker tests are left to `make matrix`.
CI = ["test_core_api.py", "test_core_serialization.py",
      "test_tfa_reference.py::test_matches_tfa_trajectory", "test_ps_wire.py"]
# The CI diagonal: every TF minor and every Python at least once (3.11 + 2.21 is `make test`'s).
CI_DIAGONAL = [("3.10", "2.16"), ("3.11", "2.17"), ("3.12", "2.18"), ("3.10", "2.19"),
               ("3.12", "2.20"), ("3.13", "2.21")]

PAIRS = [(py, tf) for tf, (_, pythons) in TENSORFLOW.items() for py in pythons]
_wheel: list = []


def find_python(version: str) -> str:
    found = shutil.which(f"python{version}")
    if found and subprocess.run([found, "-c", ""], capture_output=True).returncode == 0:
        return found
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"),
                            key=lambda p: [int(x) for x in p.split("/")[-3].split(".") if x.isdigit()])
        if candidates:
            return candidates[-1]
    raise RuntimeError(f"no Python {version}: put python{version} on PATH or `pyenv install {version}`")


def build_wheel(session: nox.Session) -> Path:
    """The wheel, built once per nox run from a copy of the checkout."""
    if _wheel:
        return _wheel[0]
    out = WORK / "dist"
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="radam_dist-matrix-src-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "out", "*.egg-info", "__pycache__", "*.pyc",
            "_generated", ".pytest_cache", ".nox"))
        session.run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(out), str(src), external=True, silent=True)
    (wheel,) = out.glob("radam_dist-*.whl")
    _wheel.append(wheel)
    return wheel


def test_files() -> list:
    choice = os.environ.get("MATRIX_TESTS", "all")
    if choice == "quick":
        return QUICK
    if choice == "ci":
        return CI
    if choice == "all":
        return [f for files in GROUPS.values() for f in files]
    return [f for group in choice.split(",") for f in (GROUPS.get(group) or [group])]


def run_pair(session: nox.Session, python: str, tf: str) -> None:
    started = time.monotonic()
    wheel = build_wheel(session)
    interpreter = find_python(python)
    name = f"py{python}-tf{tf}"
    venv = WORK / name
    vpy = str(venv / "bin" / "python")
    if os.environ.get("MATRIX_REUSE") == "1" and (venv / ".installed").exists():
        session.log(f"MATRIX_REUSE=1: reusing {venv} (a developer's shortcut, not a clean venv)")
        subprocess.run([vpy, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                        str(wheel)], check=True)
    else:
        shutil.rmtree(venv, ignore_errors=True)
        session.run(interpreter, "-m", "venv", str(venv), external=True)
        spec, _ = TENSORFLOW[tf]
        session.run(vpy, "-m", "pip", "install", "-q", f"{wheel}[ps]", spec,
                    *EXTRA_PINS.get(tf, []), *TEST_TOOLS, external=True)
        # tf-keras (the legacy Keras 2 path one strategy test takes) asks for the `tensorflow`
        # distribution, which would add the CUDA build beside tensorflow-cpu: --no-deps, as in
        # requirements-nodeps.txt.
        session.run(vpy, "-m", "pip", "install", "-q", "--no-deps", f"tf-keras=={tf}.*",
                    external=True)
        (venv / ".installed").touch()
    freeze = subprocess.run([vpy, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    (WORK / f"{name}.freeze.txt").write_text(freeze)
    wanted = {line.split("==")[0].lower(): line.split("==")[1] for line in freeze.splitlines()
              if "==" in line}
    session.log(" ".join(f"{k}=={wanted.get(k, '?')}" for k in (
        "tensorflow", "tensorflow-cpu", "keras", "protobuf", "grpcio", "grpcio-health-checking",
        "numpy")))
    with tempfile.TemporaryDirectory(prefix=f"radam_dist-matrix-{name}-") as tmp:
        work = Path(tmp)
        shutil.copytree(REPO / "tests", work / "tests",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copytree(REPO / "deploy", work / "deploy")
        shutil.copytree(REPO / "examples", work / "examples",  # test_ps_keras.py runs the PS demo
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(REPO / "pytest.ini", work / "pytest.ini")
        env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONDONTWRITEBYTECODE": "1",
               "RADAM_DIST_NATIVE_CACHE": str(work / "native-cache")}
        where = subprocess.run(
            [vpy, "-c", "import radam_dist, sys; print(radam_dist.__file__)"], cwd=work,
            capture_output=True, text=True, env={**os.environ, **env})
        if not where.stdout.startswith(str(venv)):
            session.error(f"radam_dist is not the installed wheel: {where.stdout}{where.stderr}")
        files = [f"tests/{f}" for f in test_files()]
        jobs = os.environ.get("PYTEST_JOBS", "2")
        parallel = ["-n", jobs, "--dist", "loadfile"] if jobs != "0" else []
        log = WORK / f"{name}.pytest.txt"
        try:
            with session.chdir(work), open(log, "w") as out:
                session.run(vpy, "-m", "pytest", "-p", "no:cacheprovider", *parallel, "-q",
                            *files, *session.posargs, env=env, external=True,
                            stdout=out, stderr=subprocess.STDOUT)
        finally:
            # pytest's summary line (a TensorFlow log line may follow it in the output)
            lines = log.read_text().strip().splitlines() if log.exists() else []
            tail = [ln for ln in lines if re.search(r"\d+ (passed|failed|errors?)\b", ln)][-1:]
            session.log(f"{name}: {tail} in {time.monotonic() - started:.0f} s (log: {log})")


@nox.session
@nox.parametrize("python,tf", PAIRS, ids=[f"{p}-{t}" for p, t in PAIRS])
def pair(session: nox.Session, python: str, tf: str) -> None:
    """One (Python, TensorFlow) pair: clean venv, the wheel with [ps], the tests."""
    run_pair(session, python, tf)


@nox.session
def diagonal(session: nox.Session) -> None:
    """CI: CI_DIAGONAL's pairs one after another, MATRIX_TESTS=ci unless set; fails if any fails."""
    os.environ.setdefault("MATRIX_TESTS", "ci")
    failed = []
    for python, tf in CI_DIAGONAL:
        try:
            run_pair(session, python, tf)
        except Exception as err:  # nox's CommandFailed: go on, report every failing pair
            failed.append(f"py{python}-tf{tf} ({type(err).__name__})")
    if failed:
        session.error("failing pairs: " + ", ".join(failed))
