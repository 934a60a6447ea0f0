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
assembly, validation, the optimizer step, the parameter snapshot). push_pull and echo take
turns (order rotated every repeat) so that load from other processes falls on both alike;
"turns" is the median of the repeat-by-repeat ratios (each push_pull over the echo next to
it), steadier than the ratio of the medians when the load changes. The load average is
printed with each size: on a loaded machine the PS (more CPU per byte) suffers more than the
echo, and ratios rise.

The server's own split (second table) is the median of the "PushPull split ms" lines the
server logs for the timed calls: wire_in (waiting for the upload), decode (split_message +
TensorAssembler, NaN/Inf checked chunk by chunk), validate (the remaining checks), apply (one
RAdam step; the write-ahead log if on), snapshot (ParameterStore.read), encode (values to
PullResponse bytes), wire_out (streaming them, less encoding). Below it, the client's side of
the same calls (PSClient.last_split): encode (gradients to request bytes, overlapping the
upload), wire_wait (waiting for response messages: the upload, the server's whole turn and the
download), decode (parsing them and copying into the arrays).

The in-process split (third table) times each piece of a push_pull alone, in this process, on
the same arrays and through the same functions the server and client run: client encode
(gradients to serialized PushRequests), server decode, validate, apply, snapshot, server
encode, client decode. wire = the echo round trip; rest = push_pull - wire - the pieces
(negative where pieces overlap the wire across the two cores).

    .venv/bin/python bench/ps_throughput.py [--sizes 10e6 100e6] [--repeats 5] [--no-split]
    .venv/bin/python bench/ps_throughput.py --quick   # push_pull vs echo + splits, about a minute
    .venv/bin/python bench/ps_throughput.py --quick --receive-buffer-bytes 0   # without buffer reuse
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


def interleaved(fns, repeats, times=None):
    """Median seconds of each of ``fns``, run in turns (rotated every repeat) after a warm-up;
    ``times`` (a list) receives every repeat's seconds, one list per fn."""
    for fn in fns:
        fn()
    times = times if times is not None else []
    times[:] = [[] for _ in fns]
    for rep in range(repeats):
        order = list(range(len(fns)))
        order = order[rep % len(fns):] + order[:rep % len(fns)]
        for i in order:
            t = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


PHASES = ("client_encode", "server_decode", "validate", "apply", "snapshot", "server_encode",
          "client_decode")


def split(values, grads, chunk_bytes: int, repeats: int, receive_buffer_bytes: int = 1 << 30) -> dict:
    """Median seconds of each piece of a push_pull, each run alone in this process."""
    import json

    from radam_dist.ps.proto import pb
    from radam_dist.ps.options import ServeOptions
    from radam_dist.ps.service import ShardService
    from radam_dist.ps.wire import PUSH_ROLES
    from radam_dist.ps.store import VariableSpec
    from radam_dist.ps.tensors import (BufferPool, TensorAssembler, parse_chunk_message,
                                       serialized_chunks, split_message)

    service = ShardService(ServeOptions(chunk_bytes=chunk_bytes, receive_buffer_bytes=receive_buffer_bytes))
    store = service.store
    specs = [VariableSpec(k, v.dtype.name, v.shape, 0, v.shape[0]) for k, v in values.items()]
    store.create(store.check_registration(json.dumps({"learning_rate": 1e-3}), specs), specs, values)
    state = {}
    client_pool = BufferPool(receive_buffer_bytes)  # as PSClient's (arrays dropped at once here)

    def client_encode():
        state["raw"] = [raw for k in sorted(grads)  # what PSClient sends
                        for raw in serialized_chunks(pb, k, pb.GRADIENT, grads[k], pb.PushRequest, chunk_bytes)]

    def server_decode():  # as Wire.receive does with the bytes gRPC hands it
        assembler = TensorAssembler(1 << 62, PUSH_ROLES, service.wire.expect_push, service.budget,
                                    check_finite=True, pool=service.wire.receive_pool)
        for raw in state["raw"]:
            _, _, chunk, data = split_message(pb, pb.PushRequest, raw)
            assembler.add(chunk, data)
        state["tensors"] = assembler.finish()
        state["finite"] = {name: ok for (name, _), ok in assembler.finite().items()}
        assembler.release()

    def validate():
        state["grads"] = service.wire.gradients(state["tensors"])
        store.check_gradients(state["grads"], "reject", state["finite"])

    def apply():
        store.apply(state["grads"])

    def snapshot():
        state["snapshot"] = store.read(store.names)

    def server_encode():  # as Wire.stream_values does
        state["pull"] = [raw for k in sorted(state["snapshot"])
                         for raw in serialized_chunks(pb, k, pb.VALUE, state["snapshot"][k],
                                                      pb.PullResponse, chunk_bytes)]
        # Let go of the views as the server does: a live view makes the next step copy the
        # variable first (copy-on-write), which the server never pays.
        del state["snapshot"]

    def client_decode():
        assembler = TensorAssembler(1 << 62, frozenset({pb.VALUE}), pool=client_pool)
        for raw in state["pull"]:  # as PSClient._collect does
            _, chunk, data = parse_chunk_message(pb, pb.PullResponse, raw)
            assembler.add(chunk, data)
        assembler.finish()

    fns = dict(client_encode=client_encode, server_decode=server_decode, validate=validate,
               apply=apply, snapshot=snapshot, server_encode=server_encode, client_decode=client_decode)
    out = {name: [] for name in PHASES}
    for rep in range(repeats + 1):  # the first round warms up (tf.function tracing)
        for name in PHASES:  # in pipeline order: each piece needs the one before
            t = time.perf_counter()
            fns[name]()
            if rep:
                out[name].append(time.perf_counter() - t)
    state.clear()
    service.close()
    return {name: statistics.median(t) for name, t in out.items()}


def server_split(log_path: Path, repeats: int) -> dict:
    """Medians of the server's own "PushPull split ms" log lines for the last ``repeats`` calls."""
    rows = []
    for line in log_path.read_text(errors="replace").splitlines():
        if "PushPull split ms:" in line:
            words = line.split("PushPull split ms:")[1].split()
            rows.append({words[i]: float(words[i + 1]) for i in range(0, len(words) - 1, 2)})
    rows = rows[-repeats:]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {}


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
    parser.add_argument("--echo-default-allocator", action="store_true",
                        help="the echo server keeps glibc's default malloc thresholds (a slower anchor)")
    parser.add_argument("--no-split", action="store_true", help="skip the in-process time split")
    parser.add_argument("--receive-buffer-bytes", type=int, default=1 << 30,
                        help="server and client: receive buffers kept for reuse (0: fresh memory "
                             "for every push and pull, as before buffer reuse)")
    parser.add_argument("--quick", action="store_true",
                        help="push_pull vs echo only (no push / pull alone), 5 repeats: about a minute")
    args = parser.parse_args()

    from radam_dist.ps.client import PSClient

    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name'"], capture_output=True, text=True).stdout
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {cpu.strip()}")
    print(f"{'params':>12} {'MB':>7} {'push s':>8} {'pull s':>8} {'push_pull s':>11} {'echo s':>8} "
          f"{'ratio':>6} {'turns':>6} {'PS GB/s':>8} {'echo GB/s':>9}  load (1 min, start-end)")
    splits, server_side, client_side = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        echo_cmd = [sys.executable, str(REPO / "bench" / "ps_echo_server.py")]
        echo, echo_port = start(echo_cmd + (["--default-allocator"] if args.echo_default_allocator else []),
                                tmp, "echo")
        procs = [echo]
        try:
            echo_channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}", options=[
                ("grpc.max_receive_message_length", 8 << 20)])
            for size in args.sizes:
                n = int(size) // 4 * 4
                server, port = start([sys.executable, "-m", "radam_dist.ps.cli", "serve", "--port", "0",
                                      "--mode", "async", "--max-staleness", "-1", "--checkpoint-interval", "0",
                                      "--chunk-bytes", str(args.chunk_bytes), "--log-level", "DEBUG",
                                      "--receive-buffer-bytes", str(args.receive_buffer_bytes)],
                                     tmp, f"ps{n}")
                procs.append(server)
                client = PSClient([f"127.0.0.1:{port}"], chunk_bytes=args.chunk_bytes,
                                  tune_allocator=True, receive_buffer_bytes=args.receive_buffer_bytes)
                rng = np.random.default_rng(0)
                values = {f"v{i}": rng.normal(size=n // 4).astype(np.float32) for i in range(4)}
                client.register(values, {"learning_rate": 1e-3})
                grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in values.items()}
                nbytes = 4 * n
                t_push = float("nan") if args.quick else timed(lambda: client.push(grads), args.repeats)
                t_pull = float("nan") if args.quick else timed(lambda: client.pull(), args.repeats)
                load0, turns, client_splits = os.getloadavg()[0], [], []

                def push_pull():
                    client.push_pull(grads)
                    client_splits.append(dict(client.last_split[0]))

                t_pp, t_echo = interleaved(
                    [push_pull,
                     lambda: echo_round_trip(echo_channel, nbytes, args.chunk_bytes)], args.repeats,
                    turns)
                pair = statistics.median(a / b for a, b in zip(*turns))
                print(f"{n:>12,} {nbytes / 1e6:>7.0f} {t_push:>8.3f} {t_pull:>8.3f} {t_pp:>11.3f} "
                      f"{t_echo:>8.3f} {t_pp / t_echo:>6.2f} {pair:>6.2f} {2 * nbytes / t_pp / 1e9:>8.2f} "
                      f"{2 * nbytes / t_echo / 1e9:>9.2f}  {load0:.1f}-{os.getloadavg()[0]:.1f}", flush=True)
                client.close()
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
                server_side.append((n, server_split(tmp / f"ps{n}.log", args.repeats)))
                client_side.append((n, {k: 1e3 * statistics.median(c[k] for c in client_splits[-args.repeats:])
                                        for k in ("encode", "wire_wait", "decode")}))
                if not args.no_split:
                    splits.append((n, t_pp, t_echo, split(values, grads, args.chunk_bytes, args.repeats,
                                                          args.receive_buffer_bytes)))
                del grads, values
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
    print("\nserver side of push_pull (ms, medians of its own \"PushPull split ms\" log lines for the "
          "timed calls; wire_in = waiting for the upload, wire_out = streaming the values less "
          "encoding them)")
    keys = [k for k in ("wire_in", "decode", "validate", "apply", "snapshot", "encode", "wire_out")
            if any(k in parts for _, parts in server_side)]
    print(f"{'params':>12} " + " ".join(f"{k:>9}" for k in keys) + f" {'sum':>9}")
    for n, parts in server_side:
        print(f"{n:>12,} " + " ".join(f"{parts.get(k, float('nan')):>9.1f}" for k in keys)
              + f" {sum(parts.get(k, 0.0) for k in keys):>9.1f}")
    print("\nclient side of the same calls (ms, medians; PSClient.last_split): encode = gradients "
          "to request bytes (overlaps the upload), wire_wait = waiting for response messages "
          "(covers the server's whole turn), decode = parsing them + copying into the arrays")
    print(f"{'params':>12} {'encode':>9} {'wire_wait':>9} {'decode':>9}")
    for n, parts in client_side:
        print(f"{n:>12,} {parts['encode']:>9.1f} {parts['wire_wait']:>9.1f} {parts['decode']:>9.1f}")
    if splits:
        print("\nsplit of push_pull (ms; pieces timed alone in this process, median of "
              f"{args.repeats}; rest = push_pull - wire - pieces)")
        print(f"{'params':>12} {'push_pull':>9} {'wire':>7} " + " ".join(f"{p:>13}" for p in PHASES)
              + f" {'rest':>7}")
        for n, t_pp, t_echo, pieces in splits:
            rest = t_pp - t_echo - sum(pieces.values())
            print(f"{n:>12,} {t_pp * 1e3:>9.1f} {t_echo * 1e3:>7.1f} "
                  + " ".join(f"{pieces[p] * 1e3:>13.1f}" for p in PHASES) + f" {rest * 1e3:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
