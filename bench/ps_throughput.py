"""Parameter-server throughput: push + apply + pull, against a raw gRPC byte echo.

For each model size (default 10M and 100M float32 parameters, in 4 variables) one shard runs
in its own process (`radam-ps serve`, async, RectifiedAdam); this process is the worker. We
time, median over --repeats:

* push      -- stream the gradients, server applies one RAdam step, acknowledges;
* pull      -- stream all parameters back;
* push_pull -- both in one round trip (what the Keras integration does per step);
* echo      -- the anchor: the same bytes up and back through a bare gRPC stream-stream
               method in its own process (bench/ps_echo_server.py), same 1 MiB chunks.

ratio = push_pull / echo: the cost of everything besides moving the bytes (tensor
assembly, validation, the optimizer step, the parameter snapshot).

    .venv/bin/python bench/ps_throughput.py [--sizes 10e6 100e6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def start(cmd, workdir: Path, name: str):
    port_file = workdir / f"{name}.port"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if "serve" in cmd:
        cmd = cmd + ["--port-file", str(port_file)]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(workdir / f"{name}.log", "wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        while not port_file.exists():
            if proc.poll() is not None:
                raise RuntimeError((workdir / f"{name}.log").read_text())
            time.sleep(0.05)
        return proc, int(port_file.read_text())
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, start_new_session=True)
    return proc, int(proc.stdout.readline())


def timed(fn, repeats):
    fn()  # warm-up (tf.function tracing, connection)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def echo_round_trip(channel, nbytes: int, chunk: int = 1 << 20) -> None:
    call = channel.stream_stream("/radam_dist.bench.Echo/Stream")
    blob = memoryview(np.ones(nbytes // 4, np.float32).view(np.uint8))

    def chunks():
        for offset in range(0, nbytes, chunk):
            yield blob[offset:offset + chunk].tobytes()

    received = sum(len(c) for c in call(chunks()))
    assert received == nbytes, (received, nbytes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[10e6, 100e6])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="both directions")
    args = parser.parse_args()

    from radam_dist.ps.client import PSClient

    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {cpu.strip()}")
    print(f"{'params':>12} {'MB':>7} {'push s':>8} {'pull s':>8} {'push_pull s':>11} {'echo s':>8} "
          f"{'ratio':>6} {'PS GB/s':>8} {'echo GB/s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        echo, echo_port = start([sys.executable, str(REPO / "bench" / "ps_echo_server.py")], tmp, "echo")
        procs = [echo]
        try:
            echo_channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}", options=[
                ("grpc.max_receive_message_length", 8 << 20)])
            for size in args.sizes:
                n = int(size) // 4 * 4
                server, port = start([sys.executable, "-m", "radam_dist.ps.cli", "serve", "--port", "0",
                                      "--mode", "async", "--max-staleness", "-1", "--checkpoint-interval", "0",
                                      "--chunk-bytes", str(args.chunk_bytes)],
                                     tmp, f"ps{n}")
                procs.append(server)
                client = PSClient([f"127.0.0.1:{port}"], chunk_bytes=args.chunk_bytes)
                rng = np.random.default_rng(0)
                values = {f"v{i}": rng.normal(size=n // 4).astype(np.float32) for i in range(4)}
                client.register(values, {"learning_rate": 1e-3})
                grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in values.items()}
                del values
                nbytes = 4 * n
                t_push = timed(lambda: client.push(grads), args.repeats)
                t_pull = timed(lambda: client.pull(), args.repeats)
                t_pp = timed(lambda: client.push_pull(grads), args.repeats)
                t_echo = timed(lambda: echo_round_trip(echo_channel, nbytes, args.chunk_bytes), args.repeats)
                print(f"{n:>12,} {nbytes / 1e6:>7.0f} {t_push:>8.3f} {t_pull:>8.3f} {t_pp:>11.3f} "
                      f"{t_echo:>8.3f} {t_pp / t_echo:>6.2f} {2 * nbytes / t_pp / 1e9:>8.2f} "
                      f"{2 * nbytes / t_echo / 1e9:>9.2f}", flush=True)
                client.close()
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
                del grads
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
