"""``radam-dist launch``: real processes, real signals (tasks are tiny Python scripts)."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distribute_scripts"))
import cluster_helpers as ch  # noqa: E402

FAKE = str(ch.SCRIPTS / "fake_task.py")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _pids(pid_dir):
    return {p.stem: int(p.read_text()) for p in pathlib.Path(pid_dir).glob("*.pid")}


def _launch_argv(workers, ps, *task_args):
    argv = [sys.executable, "-m", "radam_dist.cli", "launch", "--workers", str(workers)]
    if ps:
        argv += ["--ps", str(ps)]
    return argv + ["--", sys.executable, FAKE] + list(task_args)


@pytest.mark.timeout(60)
def test_every_task_gets_its_tf_config_and_prefixed_lines(tmp_path):
    code, log = ch.run(_launch_argv(2, 0, "--pid-dir", str(tmp_path), "--sleep", "0"), 50)
    assert code == 0, log
    lines = {m.group(1): m.group(2) for m in re.finditer(r"^\[(worker:\d)\] (task=.*)$", log, re.M)}
    assert sorted(lines) == ["worker:0", "worker:1"]
    clusters = set()
    for task, line in lines.items():
        assert f"task={task} type=worker index={task[-1]}" in line
        clusters.add(line.split("cluster=")[1])
    assert len(clusters) == 1  # both see the same cluster
    workers = json.loads(clusters.pop())["worker"]
    assert len(set(workers)) == 2 and all(w.startswith("127.0.0.1:") for w in workers)


@pytest.mark.timeout(60)
def test_one_failing_task_stops_all_and_exits_non_zero(tmp_path):
    start = time.monotonic()
    code, log = ch.run(_launch_argv(3, 0, "--pid-dir", str(tmp_path), "--fail-task",
                                    "worker:1", "--code", "7", "--wait-for", "3",
                                    "--sleep", "120"), 50)
    assert code == 7, log
    assert time.monotonic() - start < 40  # did not wait for the 120 s sleepers
    assert "worker:1 exited with status 7" in log
    pids = _pids(tmp_path)
    assert sorted(pids) == ["worker-0", "worker-1", "worker-2"]
    assert not any(_alive(pid) for pid in pids.values())


@pytest.mark.timeout(60)
def test_parameter_server_job_ends_with_the_chief(tmp_path):
    code, log = ch.run(_launch_argv(2, 2, "--pid-dir", str(tmp_path), "--finish-task",
                                    "chief:0", "--wait-for", "5", "--sleep", "120"), 50)
    assert code == 0, log
    pids = _pids(tmp_path)
    assert sorted(pids) == ["chief-0", "ps-0", "ps-1", "worker-0", "worker-1"]
    assert not any(_alive(pid) for pid in pids.values())  # servers stopped with the job
    cluster = json.loads(re.search(r"\[chief:0\] task=.*cluster=(.*)$", log, re.M).group(1))
    assert [len(cluster[k]) for k in ("chief", "worker", "ps")] == [1, 2, 2]


@pytest.mark.timeout(60)
def test_ctrl_c_stops_every_task(tmp_path):
    proc = subprocess.Popen(_launch_argv(2, 0, "--pid-dir", str(tmp_path), "--sleep", "120"),
                            cwd=ch.ROOT, env=ch.quiet_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        while len(_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = _pids(tmp_path)
        assert len(pids) == 2 and all(_alive(p) for p in pids.values())
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the launcher
        assert proc.wait(timeout=20) == 130
        assert not any(_alive(pid) for pid in pids.values())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_launch_without_a_command_or_workers_is_a_clear_error(capsys):
    from radam_dist import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch", "--workers", "2"])
    assert "give the command to run after `--`" in str(exit_info.value.code)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch", "--workers", "0", "--", "true"])
    assert exit_info.value.code == 2 and "--workers must be at least 1" in capsys.readouterr().err


# -- cleanup, restarts (issue 14) -----------------------------------------------------------
TASK = str(ch.SCRIPTS / "launcher_task.py")


def _argv(workers, *task_args, launcher_args=()):
    return ([sys.executable, "-m", "radam_dist.cli", "launch", "--workers", str(workers),
             *launcher_args, "--", sys.executable, TASK] + list(task_args))


def _wait_for_files(directory, names, timeout=40):
    deadline = time.monotonic() + timeout
    while not all((pathlib.Path(directory) / n).exists() for n in names):
        assert time.monotonic() < deadline, f"missing {names} in {os.listdir(directory)}"
        time.sleep(0.05)
    return {n: int((pathlib.Path(directory) / n).read_text()) for n in names}


def _wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _kill_leftovers(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(60)
def test_sigkilled_launcher_takes_tasks_and_their_children_with_it(tmp_path):
    """Launcher SIGKILLed: every task, the child it started and the child that left the
    task's process group (setsid) are gone, even on a task that ignores SIGTERM."""
    proc = subprocess.Popen(
        _argv(2, "--pid-dir", str(tmp_path), "--spawn-child", "--spawn-escaped",
              "--ignore-term", launcher_args=["--stop-grace", "1"]),
        cwd=ch.ROOT, env=ch.quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    names = [f"worker-{i}-r0{kind}.pid" for i in range(2) for kind in ("", "-child", "-escaped")]
    pids = []
    try:
        pids = list(_wait_for_files(tmp_path, names).values())
        assert all(_alive(p) for p in pids)
        proc.kill()  # the launcher only, not its process group
        proc.wait()
        assert _wait_gone(pids, 10) == []
    finally:
        _kill_leftovers(pids)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_second_ctrl_c_kills_at_once(tmp_path):
    """Tasks ignore SIGTERM; the first Ctrl-C starts the 30 s stop grace, the second cuts it."""
    proc = subprocess.Popen(
        _argv(2, "--pid-dir", str(tmp_path), "--ignore-term", launcher_args=["--stop-grace", "30"]),
        cwd=ch.ROOT, env=ch.quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    pids = []
    try:
        pids = list(_wait_for_files(tmp_path, ["worker-0-r0.pid", "worker-1-r0.pid"]).values())
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None and all(_alive(p) for p in pids), "the grace must be running"
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert time.monotonic() - start < 5
        assert _wait_gone(pids, 2) == []
        assert b"SIGINT: stopping every task (SIGKILL after 30 s" in proc.stdout.read()
    finally:
        _kill_leftovers(pids)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(60)
def test_failed_task_stops_everything_within_the_grace(tmp_path):
    """A task fails; its orphaned children and the SIGTERM-ignoring other tasks are gone, and
    the launcher exits well within 2 s (the default grace) + a margin after the failure."""
    code, log = ch.run(_argv(3, "--pid-dir", str(tmp_path), "--spawn-child", "--spawn-escaped",
                             "--ignore-term", "--fail-task", "worker:1", "--wait-for", "3"), 50)
    ended = time.time()
    assert code == 7, log
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 9
    try:
        assert _wait_gone(pids, 2) == [], "orphans of the failed task must be gone"
    finally:
        _kill_leftovers([p for p in pids if _alive(p)])
    took = ended - float((tmp_path / "failed-at").read_text())
    assert took < 2.0 + 2.0, f"launcher took {took:.1f} s after the failure"
    assert took > 1.5, "the other tasks ignore SIGTERM: the 2 s grace must have run"
    assert "worker:1 exited with status 7: stopping every task" in log


@pytest.mark.timeout(60)
def test_grace_is_configurable(tmp_path):
    code, log = ch.run(_argv(2, "--pid-dir", str(tmp_path), "--ignore-term", "--fail-task",
                             "worker:0", "--wait-for", "2", launcher_args=["--grace", "0.2"]), 50)
    took = time.time() - float((tmp_path / "failed-at").read_text())
    assert code == 7, log
    assert took < 0.2 + 1.5, f"launcher took {took:.1f} s after the failure"


@pytest.mark.timeout(90)
def test_max_restarts_restarts_the_whole_cluster(tmp_path):
    """worker:1 fails in attempts 0 and 1; attempt 2 succeeds: exit 0, every task of every
    attempt started with RADAM_DIST_RESTART, prefixed [task rN], older attempts all gone."""
    code, log = ch.run(_argv(2, "--pid-dir", str(tmp_path), "--fail-task", "worker:1",
                             "--fail-restarts", "0,1", "--wait-for", "2", "--sleep", "0.5",
                             launcher_args=["--max-restarts", "2"]), 80)
    assert code == 0, log
    for restart in range(3):
        for i in range(2):
            line = rf"^\[worker:{i} r{restart}\] task=worker:{i} restart={restart} max=2 "
            assert re.search(line, log, re.M), log
    assert "[radam-dist r0] worker:1 exited with status 7: stopping every task" in log
    assert "restart 1 of 2" in log and "restart 2 of 2" in log and "restart 3" not in log
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 6 and _wait_gone(pids, 2) == []


@pytest.mark.timeout(90)
def test_restarts_used_up_exits_with_the_tasks_status(tmp_path):
    code, log = ch.run(_argv(2, "--pid-dir", str(tmp_path), "--fail-task", "worker:0",
                             "--fail-restarts", "all", "--code", "5", "--wait-for", "2",
                             launcher_args=["--max-restarts", "1"]), 80)
    assert code == 5, log
    assert "giving up after 1 restart(s)" in log
    assert sorted(p.name for p in tmp_path.glob("worker-0-r*.pid")) == ["worker-0-r0.pid",
                                                                        "worker-0-r1.pid"]


@pytest.mark.timeout(60)
def test_task_killed_by_a_signal_is_reported_as_such(tmp_path):
    # sh kills itself with SIGKILL: the supervisor re-raises it, the launcher says so
    code, log = ch.run([sys.executable, "-m", "radam_dist.cli", "launch", "--workers", "1",
                        "--", "sh", "-c", "kill -9 $$"], 50)
    assert code == 128 + 9, log
    assert "worker:0 was killed by SIGKILL" in log


@pytest.mark.timeout(60)
def test_a_command_that_cannot_start_is_status_127():
    code, log = ch.run([sys.executable, "-m", "radam_dist.cli", "launch", "--workers", "2",
                        "--", "/nonexistent/radam-train"], 50)
    assert code == 127, log
    assert "cannot start '/nonexistent/radam-train'" in log


def test_help_lists_examples_exit_codes_and_environment_without_tensorflow():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "radam_dist.cli", "launch",
                           "--help"], cwd=ch.ROOT, env=ch.quiet_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for text in ("examples:", "exit status:", "RADAM_DIST_RESTART", "RADAM_DIST_TASK",
                 "--max-restarts", "--grace", "--netns", "130/143"):
        assert text in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
    assert "tensorflow" not in imported


LAUNCH_PACKAGE = ch.ROOT / "radam_dist" / "launch"


def _launch_modules():
    """radam_dist.launch and every module in it, by file (a new module is covered at once)."""
    return ["radam_dist.launch"] + sorted(
        f"radam_dist.launch.{p.stem}" for p in LAUNCH_PACKAGE.glob("*.py") if p.stem != "__init__")


def test_the_launch_package_imports_no_tensorflow_or_keras():
    """Process management is its own package, standard library only: every module of it
    imported in a fresh interpreter leaves TensorFlow and Keras unloaded."""
    modules = _launch_modules()
    assert {"radam_dist.launch.cluster", "radam_dist.launch.local_cluster",
            "radam_dist.launch.netns", "radam_dist.launch.supervisor"} <= set(modules)
    probe = ("import importlib, json, sys\n"
             "for name in sys.argv[1:]:\n    importlib.import_module(name)\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('tensorflow', 'keras', 'tf_keras'))))")
    proc = subprocess.run([sys.executable, "-c", probe, *modules], cwd=ch.ROOT,
                          env=ch.quiet_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], proc.stdout


def test_the_launch_package_never_imports_tensorflow_even_lazily():
    """Not even inside a function: a TensorFlow import belongs to radam_dist.distribute."""
    import ast

    for path in sorted(LAUNCH_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            heavy = [n for n in names if n.split(".")[0] in ("tensorflow", "keras", "tf_keras")
                     or n.startswith(("radam_dist.distribute", "radam_dist.optimizers"))]
            assert not heavy, f"{path.name}:{node.lineno} imports {heavy}"


@pytest.mark.parametrize("args, message", [
    (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
    (["--grace", "-1"], "--grace and --stop-grace must be >= 0"),
    (["--netns", "worker:0"], "expected TASK=NAMESPACE@ADDRESS"),
    (["--netns", "worker:5=h@10.231.0.1"], "no task worker:5 in this cluster"),
    (["--netns", "worker:0=radam-no-such-ns@10.231.0.1"],
     "no network namespace 'radam-no-such-ns'"),
])
def test_bad_launch_arguments_are_clear_errors(args, message):
    proc = subprocess.run([sys.executable, "-m", "radam_dist.cli", "launch", "--workers", "2",
                           *args, "--", "true"], cwd=ch.ROOT, env=ch.quiet_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.timeout(300)
def test_backup_and_restore_after_a_killed_worker_gives_the_uninterrupted_weights(tmp_path):
    """2-worker MWMS model.fit, Lookahead(RectifiedAdam), keras.callbacks.BackupAndRestore:
    worker 1 is SIGKILLed in the middle of epoch 1 of 3; after one restart (which resumes at
    epoch 1 from the backup) the weights equal those of an uninterrupted run."""
    import numpy as np

    script = str(ch.SCRIPTS / "backup_restore_fit.py")

    def run(name, *extra, launcher_args=()):
        argv = [sys.executable, "-m", "radam_dist.cli", "launch", "--workers", "2",
                *launcher_args, "--", sys.executable, script, "--backup-dir",
                str(tmp_path / name / "backup"), "--out", str(tmp_path / f"{name}.json"), *extra]
        code, log = ch.run(argv, 200)
        assert code == 0, log
        return json.loads((tmp_path / f"{name}.json").read_text()), log

    plain, _ = run("plain")
    resumed, log = run("resumed", "--kill-at", "1,2", launcher_args=["--max-restarts", "1"])
    assert "[worker:1 r0] killing myself at epoch 1 batch 2" in log
    assert "worker:1 was killed by SIGKILL" in log and "restart 1 of 1" in log
    assert plain["restart"] == 0 and plain["epochs"] == [0, 1, 2]
    assert resumed["restart"] == 1 and resumed["epochs"] == [1, 2], "must resume, not redo"
    assert plain["iterations"] == resumed["iterations"] == 18
    assert not (tmp_path / "resumed" / "backup" / "worker-0").exists()  # deleted at the end
    moved = max(np.abs(np.subtract(w, i)).max() for w, i in zip(plain["weights"], plain["initial"]))
    assert moved > 1e-2, "the model must actually train"
    for got, want in zip(resumed["weights"], plain["weights"]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
