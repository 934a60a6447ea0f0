"""ZeRO-1's gradient exchange (radam_dist/distribute/zero.py ``choose_exchange``).

TensorFlow 2.21 has no CPU reduce-scatter collective (``CollectiveReduceScatterV2`` is NCCL
only), so under a single-worker MirroredStrategy the reduce-scatter and the all-gather run in
the step's graph (``local-reduce-scatter``); under MWMS the dense gradients' row blocks go by
an all-to-all collective, summed by the receiver (``all-to-all``); where the whole sum is
needed Keras' all-reduce, then a slice (``all-reduce+slice``). These tests, under
MirroredStrategy over 2 and 4 logical CPUs and MWMS over 2 worker processes, with the model
of tests/distribute_scripts/trajectory.py (an Embedding with sparse gradients and a Dense
layer whose 1-row bias is padded), check:

* the exchange taken (``zero.exchange_path``) is ``local-reduce-scatter`` by default and
  ``all-reduce+slice`` under ``RADAM_DIST_ZERO_EXCHANGE=all-reduce`` and with clipnorm;
* over 2 replicas the two exchanges give the same bits for 6 steps (weights and every slot):
  a + b is b + a in IEEE arithmetic, and the update is the same math;
* over 4 replicas (Lookahead(RectifiedAdam), in a process of its own) they agree to float32
  round-off: the ring all-reduce may add the four gradients in another order than our
  0 + 1 + 2 + 3 (on this model they happened to give the same bits);
* the local shard's update in compiled chunks (``executor.update_rows``) gives the bits of
  the per-variable update: of all-reduce+slice's (above), and of the local exchange's with
  ``RADAM_DIST_FUSED=0`` (amsgrad);
* under MWMS x2 (one pair of worker processes, three optimizers in turn) ``all-to-all`` is
  the default and gives, step by step, the bits of ``all-reduce+slice``
  (``RADAM_DIST_ZERO_EXCHANGE=all-reduce``), of the unsharded optimizer and of the local
  exchange over 2 logical CPUs; over 4 worker processes ``all-to-all`` and
  ``all-reduce+slice`` agree to float32 round-off (another order of the sum);
* ``bytes_sent_per_replica`` is the stated formula for these shapes, for every exchange.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

if __name__ == "__main__" and sys.argv[1:] == ["four"]:  # pytest: conftest.py made 2 CPUs
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 4)

import radam_dist  # noqa: E402
from radam_dist import native, radam_math  # noqa: E402
from radam_dist.distribute import zero  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distribute_scripts"))
import cluster_helpers as ch  # noqa: E402
import trajectory as t  # noqa: E402

pytestmark = pytest.mark.timeout(120)

STEPS = 6
DATA = t.make_data()


_RUNS = {}  # the same run is asked for by several tests: made once


def _run(n, kind="radam", **options):
    """STEPS steps of ZeRO-1 over n logical CPUs: (exchange, per-step weights, final state,
    optimizer); runs are cached by their arguments and the two switches in the environment."""
    key = (n, kind, tuple(sorted(options.items())), os.environ.get(zero.EXCHANGE_ENV),
           os.environ.get("RADAM_DIST_FUSED"))
    if key not in _RUNS:
        _RUNS[key] = _make_run(n, kind, **options)
    return _RUNS[key]


def _make_run(n, kind, strategy=None, shard=True, **options):
    if strategy is None:
        if len(tf.config.list_logical_devices("CPU")) < n:
            pytest.skip(f"needs {n} logical CPUs (TensorFlow started with fewer)")
        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
    with strategy.scope():
        model = t.build_model()
        radam = radam_dist.RectifiedAdam(learning_rate=0.02, weight_decay=0.01,
                                         shard_optimizer_state=shard, **options)
        optimizer = radam if kind == "radam" else radam_dist.Lookahead(
            radam, sync_period=2, slow_step_size=0.5)
        optimizer.build(model.trainable_variables)
    step = t.distributed_step(strategy, model, optimizer)
    ids, feats, y = DATA
    per = t.GLOBAL_BATCH // n
    weights = []
    for k in range(STEPS):
        sl = slice(k * t.GLOBAL_BATCH, (k + 1) * t.GLOBAL_BATCH)
        batch = strategy.experimental_distribute_values_from_function(
            lambda ctx, sl=sl: tuple(
                tf.constant(a[sl][ctx.replica_id_in_sync_group * per:
                                  (ctx.replica_id_in_sync_group + 1) * per])
                for a in (ids, feats, y)))
        step(*batch)
        weights.append(model.get_weights())
    exchange = zero.exchange_path(optimizer) if shard else "unsharded"
    return exchange, weights, optimizer.get_weights(), optimizer


def _bits(arrays):
    return [np.asarray(a, np.float32).view(np.uint32) for a in arrays]


def _assert_bit_equal(a, b):
    for step_a, step_b in zip(a[1], b[1]):
        for x, y in zip(_bits(step_a), _bits(step_b)):
            assert np.array_equal(x, y)
    for x, y in zip(_bits(a[2]), _bits(b[2])):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("kind", ["radam", "ranger"])
def test_two_replicas_reduce_scatter_is_bit_equal_to_all_reduce_and_slice(kind, monkeypatch):
    local = _run(2, kind)
    monkeypatch.setenv(zero.EXCHANGE_ENV, "all-reduce")
    reference = _run(2, kind)
    assert local[0] == zero.LOCAL_REDUCE_SCATTER
    assert reference[0] == zero.ALL_REDUCE_SLICE
    _assert_bit_equal(local, reference)
    assert not np.array_equal(local[1][0][0], local[1][-1][0])  # the weights did move


def _four_replicas() -> dict:
    """Both exchanges over 4 logical CPUs (run as a script: pytest's process has 2)."""
    local = _run(4, "ranger")
    os.environ[zero.EXCHANGE_ENV] = "all-reduce"
    reference = _run(4, "ranger")
    deviation = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                    for step_a, step_b in zip(local[1], reference[1])
                    for x, y in zip(step_a, step_b))
    moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                for x, y in zip(local[1][0], local[1][-1]))
    return {"exchanges": [local[0], reference[0]], "deviation": deviation, "moved": moved}


def test_four_replicas_agree_to_round_off():
    out = subprocess.run([sys.executable, __file__, "four"], capture_output=True, text=True,
                         timeout=100, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["exchanges"] == [zero.LOCAL_REDUCE_SCATTER, zero.ALL_REDUCE_SLICE]
    assert result["moved"] > 1e-2  # six steps of lr 0.02 did move the weights
    assert result["deviation"] < 1e-6  # float32 round-off of weights of order 1


MWMS_CONFIGS = {"default": {}, "all-reduce": {zero.EXCHANGE_ENV: "all-reduce"},
                "unsharded": None}


def test_mwms_all_to_all_is_bit_equal_to_all_reduce_slice_and_unsharded(tmp_path):
    """Lookahead(RectifiedAdam) under MWMS over two worker processes, three optimizers in
    turn: the default exchange is ``all-to-all`` (the dense gradients' row blocks by
    CollectiveAllToAllV2, summed by the receiver; the Embedding's IndexedSlices by Keras'
    all-reduce; only its touched rows travel back); ``RADAM_DIST_ZERO_EXCHANGE=all-reduce``
    takes ``all-reduce+slice``. Both give, step by step, the bits of the unsharded optimizer
    and of the in-graph exchange over 2 logical CPUs (N = 2: a + b == b + a), and the
    collectives after the all-to-all (all-gather, the next optimizer's) still run."""
    out = tmp_path / "mwms.json"
    code, log = ch.launch(2, 0, [__file__, "mwms", str(out)], 150)
    assert code == 0, log[-4000:]
    result = json.loads(out.read_text())
    assert [result[c]["exchange"] for c in MWMS_CONFIGS] == [
        zero.ALL_TO_ALL, zero.ALL_REDUCE_SLICE, "unsharded"]
    for config in ("default", "all-reduce"):  # the Embedding's gradient was sparse
        assert result[config]["sparse_index_bytes"] == {"0": 4}
    runs = {config: (r["exchange"], [[np.asarray(w, np.float32) for w in step]
                                     for step in r["weights"]],
                     [np.asarray(w, np.float32) for w in r["state"]])
            for config, r in result.items() if config in MWMS_CONFIGS}
    assert all(len(r[1]) == STEPS for r in runs.values())
    _assert_bit_equal(runs["default"], runs["all-reduce"])
    _assert_bit_equal(runs["default"], runs["unsharded"])
    local = _run(2, "ranger")
    assert local[0] == zero.LOCAL_REDUCE_SCATTER
    _assert_bit_equal(local, runs["default"])
    # the whole summed gradient needed: all-reduce+slice under MWMS too
    assert result["fallbacks"] == {"clipnorm": zero.ALL_REDUCE_SLICE,
                                   "global_clipnorm": zero.ALL_REDUCE_SLICE,
                                   "all_reduce_dtype": zero.ALL_REDUCE_SLICE}
    # bytes: the dense ones a reduce-scatter's (N-1)/N P, the Embedding's as all-reduce+slice
    k, row, index, g, p = 8 * 3, 16, 4, 64 + 4, 64 + 8  # as test_bytes_sent_per_replica_...
    entries, changed = k * (row + index), 12 * (row + index)
    assert result["default"]["bytes"] == {
        "exchange": zero.ALL_TO_ALL, "replicas": 2, "reduce": p // 2 + entries,
        "gather": p // 2 + changed, "total": p + entries + changed, "unsharded": g + entries}
    assert result["all-reduce"]["bytes"]["reduce"] == g + entries
    assert not np.array_equal(runs["default"][1][0][0], runs["default"][1][-1][0])  # moved


def _mwms_worker(out_path):
    """One worker of the MWMS test (``radam-dist launch --workers 2``); worker 0 writes."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    result = {}
    for config, env in MWMS_CONFIGS.items():
        os.environ.pop(zero.EXCHANGE_ENV, None)
        os.environ.update(env or {})  # read when the step is traced (its first call)
        exchange, weights, state, optimizer = _make_run(2, "ranger", strategy=strategy,
                                                        shard=env is not None)
        layout = optimizer.inner_optimizer._state_layout
        result[config] = {
            "exchange": exchange,
            "sparse_index_bytes": {str(k): v for k, v in
                                   getattr(layout, "sparse_index_bytes", {}).items()},
            "weights": [[np.asarray(w).tolist() for w in step] for step in weights],
            "state": [np.asarray(w).tolist() for w in state]}
        if env is not None:
            result[config]["bytes"] = zero.bytes_sent_per_replica(optimizer, sparse_rows=8 * 3)
    os.environ.pop(zero.EXCHANGE_ENV, None)
    with strategy.scope():
        result["fallbacks"] = {
            name: radam_dist.RectifiedAdam(
                shard_optimizer_state=True, **{name: value}).step_plan().zero_exchange()[0]
            for name, value in (("clipnorm", 1.0), ("global_clipnorm", 1.0),
                                ("all_reduce_dtype", "float16"))}
    if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


def test_mwms_four_workers_all_to_all_agrees_with_all_reduce_slice(tmp_path):
    """MWMS over four worker processes: the all-to-all's rank order is the replica order
    (each worker updates its own rows), and the receiver's sum 0 + 1 + 2 + 3 agrees with
    the ring all-reduce's (another order) to float32 round-off."""
    out = tmp_path / "mwms4.json"
    code, log = ch.launch(4, 0, [__file__, "mwms4", str(out)], 150)
    assert code == 0, log[-4000:]
    result = json.loads(out.read_text())
    assert result["exchanges"] == [zero.ALL_TO_ALL, zero.ALL_REDUCE_SLICE]
    assert result["moved"] > 1e-2
    assert result["deviation"] < 1e-6


def _mwms4_worker(out_path):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    runs = []
    for env in ({}, {zero.EXCHANGE_ENV: "all-reduce"}):
        os.environ.pop(zero.EXCHANGE_ENV, None)
        os.environ.update(env)
        runs.append(_make_run(4, "radam", strategy=strategy))
    deviation = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                    for step_a, step_b in zip(runs[0][1], runs[1][1])
                    for x, y in zip(step_a, step_b))
    moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                for x, y in zip(runs[0][1][0], runs[0][1][-1]))
    if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
        with open(out_path, "w") as f:
            json.dump({"exchanges": [r[0] for r in runs], "deviation": deviation,
                       "moved": moved}, f)


def test_clipnorm_takes_all_reduce_and_slice():
    assert _run(2, clipnorm=1.0)[0] == zero.ALL_REDUCE_SLICE


def test_fused_local_shard_is_bit_equal_to_the_per_variable_update(monkeypatch):
    """amsgrad here; without it the two-replica test above compares the local update with
    the per-variable update of all-reduce+slice. The shards' rows take the one-pass kernel
    (the step plan's choice on CPU), the XLA chunks with RADAM_DIST_NATIVE=0, and one TF op
    at a time with RADAM_DIST_FUSED=0: the same bits all three ways."""
    rows_served = []
    real = native.apply_dense

    def spy(update):
        if isinstance(update.var, radam_math.Rows):
            rows_served.append(update)
        return real(update)

    monkeypatch.setattr(native, "apply_dense", spy)
    kernel_run = _make_run(2, "radam", amsgrad=True)
    assert rows_served, "the one-pass kernel served no shard's rows"
    assert not any(k[0] == "radam-rows" for k in kernel_run[3]._fused_compiled)
    monkeypatch.setenv("RADAM_DIST_NATIVE", "0")
    del rows_served[:]
    chunks_run = _make_run(2, "radam", amsgrad=True)
    assert not rows_served
    assert any(k[0] == "radam-rows" for k in chunks_run[3]._fused_compiled)  # chunks ran
    monkeypatch.setenv("RADAM_DIST_FUSED", "0")
    plain = _make_run(2, "radam", amsgrad=True)
    assert not plain[3].__dict__.get("_fused_compiled")
    _assert_bit_equal(kernel_run, plain)
    _assert_bit_equal(chunks_run, plain)


def test_bytes_sent_per_replica_is_the_formula():
    optimizer = _run(2)[3]
    # Two replicas. The Embedding (24x4, row 16 bytes) gets an IndexedSlices gradient with
    # int32 indices: k = 8 examples x 3 ids rows per replica. Dense: kernel 16x1 (64 bytes)
    # and bias 1 (4 bytes; padded to 2 rows, 8).
    assert optimizer._state_layout.sparse_index_bytes == {0: 4}
    k, row, index = 8 * 3, 16, 4
    g, p = 64 + 4, 64 + 8  # dense variables, unpadded and padded
    entries = k * (row + index)  # (N - 1) k (R + X) with N = 2
    local = zero.bytes_sent_per_replica(optimizer, sparse_rows=k)
    assert local["exchange"] == zero.LOCAL_REDUCE_SCATTER
    # back: the changes of at most a chunk's rows (12 here) with their indices
    changed = 12 * (row + index)
    assert (local["reduce"], local["gather"]) == (p // 2 + entries, p // 2 + changed)
    sliced = zero.bytes_sent_per_replica(optimizer, zero.ALL_REDUCE_SLICE, sparse_rows=k)
    # the Embedding's touched rows travel (with their indices), not its whole shard
    assert (sliced["reduce"], sliced["gather"]) == (g + entries, p // 2 + changed)
    # MWMS's all-to-all: the dense rows as the local reduce-scatter, the sparse as sliced
    to_all = zero.bytes_sent_per_replica(optimizer, zero.ALL_TO_ALL, sparse_rows=k)
    assert (to_all["reduce"], to_all["gather"]) == (p // 2 + entries, p // 2 + changed)
    assert local["unsharded"] == sliced["unsharded"] == g + entries
    assert local["total"] == local["reduce"] + local["gather"]


if __name__ == "__main__":
    if sys.argv[1:] == ["four"]:
        print(json.dumps(_four_replicas()))
    elif sys.argv[1:2] == ["mwms"]:
        _mwms_worker(sys.argv[2])
    elif sys.argv[1:2] == ["mwms4"]:
        _mwms4_worker(sys.argv[2])
