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
