"""A short run through the parameter servers: 2 shard processes, 2 Keras workers (`model.fit`).

``run(out_dir)`` starts two ``radam-ps serve`` shards in sync mode, then two worker processes
that train the same small model (an embedding table split by rows across the shards plus dense
layers) on their halves of a synthetic data set with ``ParameterServerOptimizer``. It returns
summary lines; the worker results and server logs land in ``out_dir``.

    python -m examples.ps.demo --out out/ps         (from the checkout's root)
    python examples/ps/demo.py worker --targets HOST:PORT ... --index I --num-workers K
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

log = logging.getLogger(__name__)

VOCAB, IDS, FEATURES = 200, 4, 8
STEPS, BATCH = 40, 32
SPLIT_THRESHOLD = 4096  # the 200 x 8 table (6400 bytes) is split, the dense layers are not


def _optimizer():
    from radam_dist import Lookahead, RectifiedAdam

    return Lookahead(RectifiedAdam(learning_rate=0.05, total_steps=STEPS, warmup_proportion=0.1),
                     sync_period=5)


def _data(worker: int, num_workers: int):
    import numpy as np

    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, 1)).astype(np.float32)
    w = rng.normal(size=(FEATURES,)).astype(np.float32)
    n = STEPS * BATCH * num_workers
    ids = rng.integers(0, VOCAB, size=(n, IDS)).astype(np.int32)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (table[ids].mean(axis=(1, 2)) + x @ w).astype(np.float32)[:, None]
    part = slice(worker, None, num_workers)
    return (ids[part], x[part]), y[part]


def _model():
    import keras

    keras.utils.set_random_seed(1)
    ids = keras.Input((IDS,), dtype="int32", name="ids")
    x = keras.Input((FEATURES,), name="x")
    e = keras.layers.Embedding(VOCAB, 8, name="emb")(ids)
    h = keras.layers.Concatenate()([keras.ops.mean(e, axis=1), x])
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    return keras.Model([ids, x], keras.layers.Dense(1, name="out")(h))


def worker_main(targets: List[str], index: int, num_workers: int, out: Path, token=None,
                **tls) -> dict:
    """One worker: model.fit through the servers; returns (and writes) its results."""
    import numpy as np

    from radam_dist.ps.client import PSClient
    from radam_dist.ps.keras_integration import ParameterServerOptimizer

    client = PSClient(targets, token=token, worker_id=f"demo-worker-{index}",
                      split_threshold_bytes=SPLIT_THRESHOLD, **tls)
    model = _model()
    model.compile(optimizer=ParameterServerOptimizer(client, _optimizer()), loss="mse", jit_compile=False)
    (ids, x), y = _data(index, num_workers)
    loss_before = float(model.evaluate({"ids": ids, "x": x}, y, verbose=0))
    start = time.monotonic()
    history = model.fit({"ids": ids, "x": x}, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    seconds = time.monotonic() - start
    pulled = client.pull()
    by_path = {v.path: np.asarray(v) for v in model.trainable_variables}
    diff = max(float(np.max(np.abs(pulled[p] - by_path[p]))) for p in by_path)
    loss_after = float(model.evaluate({"ids": ids, "x": x}, y, verbose=0))
    stats = client.stats()
    result = {"worker": index, "loss": history.history["loss"], "seconds": seconds,
              "max_abs_diff_to_servers": diff, "versions": [s["version"] for s in stats],
              "loss_before": loss_before, "loss_after": loss_after,
              "split": client.placement["emb/embeddings"].is_split if "emb/embeddings" in client.placement else None}
    (out / f"worker-{index}.json").write_text(json.dumps(result, indent=1))
    client.close()
    return result


def _start_server(out: Path, name: str, args: List[str], env: dict) -> subprocess.Popen:
    port_file = out / f"{name}.port"
    port_file.unlink(missing_ok=True)
    with open(out / f"{name}.log", "wb") as logf:
        return subprocess.Popen([sys.executable, "-m", "radam_dist.ps.cli", "serve", "--port", "0",
                                 "--port-file", str(port_file), *args],
                                stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_port(out: Path, name: str, proc: subprocess.Popen, timeout: float = 120) -> int:
    port_file = out / f"{name}.port"
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {out / (name + '.log')}")
        time.sleep(0.05)
    return int(port_file.read_text())


def run(out_dir: str) -> List[str]:
    """2 shard processes + 2 worker processes; returns summary lines (about 30-50 s on 2 cores)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ckpt*"):  # a fresh job: a previous run's checkpoints would resume it
        shutil.rmtree(old)
    # the shards' own secret for signing sync-round decisions; workers never get it
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", RADAM_PS_TOKEN="")
    server_env = dict(env, RADAM_PS_SERVER_KEY=secrets.token_urlsafe(32))
    started = time.monotonic()
    procs = []
    try:
        for i in range(2):
            procs.append(_start_server(out, f"shard{i}", [
                "--mode", "sync", "--num-workers", "2", "--num-shards", "2", "--shard-index", str(i),
                "--checkpoint-dir", str(out / f"ckpt{i}"), "--checkpoint-interval", "0",
                "--sync-timeout", "120"], server_env))
        workers = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker",
                                     "--out", str(out), "--index", str(i), "--num-workers", "2",
                                     "--wait-for-ports", str(out / "shard0.port"), str(out / "shard1.port")],
                                    env=env, stdout=open(out / f"worker-{i}.log", "wb"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
                   for i in range(2)]
        procs.extend(workers)
        for i in range(2):
            _wait_port(out, f"shard{i}", procs[i])
        for i, w in enumerate(workers):
            if w.wait(300) != 0:
                raise RuntimeError(f"worker {i} failed; see {out / f'worker-{i}.log'}")
        for p in procs[:2]:  # SIGTERM: final checkpoint
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs[:2]:
            p.wait(60)
        results = [json.loads((out / f"worker-{i}.json").read_text()) for i in range(2)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    checkpoints = sorted(str(p.relative_to(out)) for p in out.glob("ckpt*/ckpt-*.radps"))
    lines = [f"parameter servers: 2 shards (sync, 2 workers), {STEPS} steps of model.fit per worker, "
             f"embedding split by rows: {results[0]['split']}"]
    for r in results:
        lines.append(f"worker {r['worker']}: mse on its data {r['loss_before']:.4f} -> {r['loss_after']:.4f}; "
                     f"shard versions {r['versions']}; "
                     f"max |worker - server| = {r['max_abs_diff_to_servers']:.1e}; {r['seconds']:.1f}s in fit")
    lines.append(f"checkpoints written on SIGTERM: {', '.join(checkpoints)}; total {time.monotonic() - started:.1f}s")
    return lines


def _worker_cli(args) -> int:
    targets = list(args.targets or [])
    deadline = time.monotonic() + 120
    for path in args.wait_for_ports or []:
        while not Path(path).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} never appeared")
            time.sleep(0.05)
        targets.append(f"127.0.0.1:{int(Path(path).read_text())}")
    if not targets:
        raise SystemExit("give --targets or --wait-for-ports")
    from radam_dist.ps.auth import load_token

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tls = {k: v for k, v in (("root_certificates", args.tls_ca), ("client_cert", args.tls_client_cert),
                             ("client_key", args.tls_client_key)) if v}
    worker_main(targets, args.index, args.num_workers, out, load_token(args.token_file), **tls)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="one demo worker (model.fit through the shards)")
    w.add_argument("--out", required=True)
    w.add_argument("--index", type=int, required=True)
    w.add_argument("--num-workers", type=int, default=2)
    w.add_argument("--targets", nargs="+", help="shard addresses host:port, in shard order")
    w.add_argument("--wait-for-ports", nargs="+", help="(local runs) port files of the shards")
    w.add_argument("--token-file", help="bearer token (default: $RADAM_PS_TOKEN)")
    w.add_argument("--tls-ca", help="CA of the server certificates (turns TLS on)")
    w.add_argument("--tls-client-cert", help="client certificate for mutual TLS")
    w.add_argument("--tls-client-key", help="client key for mutual TLS")
    parser.add_argument("--out", default="out/ps", help="where logs, results and checkpoints go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "worker":
        return _worker_cli(args)
    for line in run(args.out):
        logging.getLogger(__name__).info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
