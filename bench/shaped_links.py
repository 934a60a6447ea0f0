"""Step times across shaped links: every task on its own "host" (a Linux network namespace,
tests/netns_helpers.py), every link limited with `tc ... tbf`.

    sudo .venv/bin/python bench/shaped_links.py [--steps 30] [--mwms-params 1048576]

1. MWMS: 2 workers (`radam-dist launch --netns`), one all-reduce of --mwms-params float32
   gradients + a RectifiedAdam step per step, at 100 Mbit/s, 1 Gbit/s and unshaped veth.
   Anchor: the unshaped run (ratio = shaped / unshaped), and the wire time a ring all-reduce
   needs at least (each worker sends and receives (n-1)/n * 2 * bytes; n = 2: the gradient
   size once each way).
2. Parameter server: 2 sync workers push --ps-rows x 64 float32 (split by rows over the shards)
   to 1 and to 2 shards, each on its own host, 1 Gbit/s links. Anchor: the 1-shard run. With
   one shard its link carries both workers' gradients; with two, each shard link half of that.

Needs root (namespaces); uses only 10.231.0.x inside the namespaces it creates and deletes.
Prints a Markdown table per part: medians over the steps after the first 3.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import netns_helpers as nh  # noqa: E402

SCRIPTS = ROOT / "tests" / "distribute_scripts"


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    return env


def _median_after_warmup(times, warmup=3):
    return statistics.median(times[warmup:] if len(times) > warmup + 2 else times)


def mwms_step(rate, steps, params, work):
    with nh.Fabric(2, rate=rate) as fabric:
        out = work / f"mwms-{rate}.json"
        argv = [sys.executable, "-m", "radam_dist.cli", "launch", "--workers", "2"]
        for i in range(2):
            argv += ["--netns", f"worker:{i}={fabric.hosts[i]}@{fabric.address(i)}"]
        argv += ["--", sys.executable, str(SCRIPTS / "netns_mwms_train.py"), "--params",
                 str(params), "--max-steps", str(steps), "--progress", str(work / "progress"),
                 "--out", str(out)]
        proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-3000:])
        return _median_after_warmup(json.loads(out.read_text())["times"])


def ps_step(shards, steps, rows, rate, work):
    with nh.Fabric(shards + 2, rate=rate) as fabric:
        ports = []
        for i in range(shards):
            port_file = work / f"shard{i}-{shards}.port"
            port_file.unlink(missing_ok=True)
            fabric.popen(i, [sys.executable, "-m", "radam_dist.ps.cli", "serve", "--host",
                             fabric.address(i), "--port", "0", "--port-file", str(port_file),
                             "--insecure", "--mode", "sync", "--num-workers", "2",
                             "--num-shards", str(shards), "--shard-index", str(i)],
                         work / f"shard{i}-{shards}.log",
                         env=dict(_env(), RADAM_PS_SERVER_KEY="bench-server-key"))
            ports.append(port_file)
        deadline = time.monotonic() + 180
        while not all(p.exists() for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("shards did not start")
            time.sleep(0.1)
        targets = ",".join(f"{fabric.address(i)}:{int(p.read_text())}"
                           for i, p in enumerate(ports))
        workers = []
        for w in range(2):
            argv = [sys.executable, str(SCRIPTS / "netns_ps_worker.py"), "--targets", targets,
                    "--worker", str(w), "--steps", str(steps), "--rows", str(rows),
                    "--progress", str(work / f"ps-progress{w}"),
                    "--out", str(work / f"ps{shards}-w{w}.json")]
            workers.append(fabric.popen(shards + w, argv, work / f"ps-w{w}.log", env=_env()))
        for w, proc in enumerate(workers):
            if proc.wait(600) != 0:
                raise RuntimeError((work / f"ps-w{w}.log").read_text()[-3000:])
        return statistics.median(
            _median_after_warmup(json.loads((work / f"ps{shards}-w{w}.json").read_text())["times"])
            for w in range(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mwms-params", type=int, default=1 << 20)
    parser.add_argument("--ps-rows", type=int, default=16384)
    parser.add_argument("--ps-rate", default="1gbit")
    args = parser.parse_args()
    reason = nh.unavailable_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; "
          f"command: {' '.join(sys.argv)}\n")
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        mb = args.mwms_params * 4 / 1e6
        print(f"MWMS, 2 workers, {args.mwms_params:,} float32 ({mb:.1f} MB) all-reduced per step\n")
        print("| link | ms/step | vs unshaped | wire time at least, ms |")
        print("|---|---:|---:|---:|")
        results = {rate: mwms_step(rate, args.steps, args.mwms_params, work)
                   for rate in (None, "1gbit", "100mbit")}
        for rate in ("100mbit", "1gbit", None):
            wire = f"{mb * 8e6 / nh._parse_rate(rate) * 1e3:.0f}" if rate else "-"
            print(f"| {rate or 'unshaped veth'} | {results[rate] * 1e3:.1f} | "
                  f"{results[rate] / results[None]:.2f} | {wire} |")
        ps_mb = args.ps_rows * 64 * 4 / 1e6 + 128 * 64 * 4 / 1e6
        print(f"\nParameter server, sync, 2 workers, {ps_mb:.1f} MB of gradients per worker "
              f"per step, {args.ps_rate} links\n")
        print("| shards | push ms/step (median of the 2 workers) | vs 1 shard |")
        print("|---:|---:|---:|")
        ps = {s: ps_step(s, args.steps, args.ps_rows, args.ps_rate, work) for s in (1, 2)}
        for s in (1, 2):
            print(f"| {s} | {ps[s] * 1e3:.1f} | {ps[s] / ps[1]:.2f} |")


if __name__ == "__main__":
    main()
