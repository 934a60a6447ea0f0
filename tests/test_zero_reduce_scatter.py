"""ZeRO-1's gradient exchange (radam_dist/distribute/zero.py ``choose_exchange``).

TensorFlow 2.21 has no CPU reduce-scatter collective (``CollectiveReduceScatterV2`` is NCCL
only), so under a single-worker MirroredStrategy the reduce-scatter and the all-gather run in
the step's graph (``local-reduce-scatter``); elsewhere Keras' all-reduce, then a slice
(``all-reduce+slice``). These tests, under MirroredStrategy over 2 and 4 logical CPUs with
the model of tests/distribute_scripts/trajectory.py (an Embedding with sparse gradients and a
Dense layer whose 1-row bias is padded), check:

* the exchange taken (``zero.exchange_path``) is ``local-reduce-scatter`` by default and
  ``all-reduce+slice`` under ``RADAM_DIST_ZERO_EXCHANGE=all-reduce`` and with clipnorm;
* over 2 replicas the two exchanges give the same bits for 6 steps (weights and every slot):
  a + b is b + a in IEEE arithmetic, and the update is the same math;
* over 4 replicas (Lookahead(RectifiedAdam), in a process of its own) they agree to float32
  round-off: the ring all-reduce may add the four gradients in another order than our
  0 + 1 + 2 + 3 (on this model they happened to give the same bits);
* the local shard's update in compiled chunks (``fused.apply_dense_rows``) gives the bits of
  the per-variable update: of all-reduce+slice's (above), and of the local exchange's with
  ``RADAM_DIST_FUSED=0`` (amsgrad);
* ``bytes_sent_per_replica`` is the stated formula for these shapes.
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


def _make_run(n, kind, strategy=None, **options):
    if strategy is None:
        if len(tf.config.list_logical_devices("CPU")) < n:
            pytest.skip(f"needs {n} logical CPUs (TensorFlow started with fewer)")
        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(n)])
    with strategy.scope():
        model = t.build_model()
        radam = radam_dist.RectifiedAdam(learning_rate=0.02, weight_decay=0.01,
                                         shard_optimizer_state=True, **options)
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
    return zero.exchange_path(optimizer), weights, optimizer.get_weights(), optimizer


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


def test_mwms_sparse_rows_exchange_is_bit_equal_to_the_local_exchange(tmp_path):
    """Lookahead(RectifiedAdam) under MWMS over two worker processes (all-reduce+slice: only
    the Embedding's touched rows travel, as values with their indices, and every worker
    scatter-adds them) gives, step by step, the bits of the in-graph exchange over 2
    logical CPUs (at HEAD 62f37c4 bit-equal to all-reduce+slice with the whole shard
    gathered; the test above keeps it bit-equal to all-reduce+slice in one process)."""
    out = tmp_path / "mwms.json"
    code, log = ch.launch(2, 0, [__file__, "mwms", str(out)], 150)
    assert code == 0, log[-4000:]
    result = json.loads(out.read_text())
    assert result["exchange"] == zero.ALL_REDUCE_SLICE
    assert result["sparse_index_bytes"] == {"0": 4}  # the Embedding's gradient was sparse
    local = _run(2, "ranger")
    assert local[0] == zero.LOCAL_REDUCE_SCATTER
    mwms = (result["exchange"], [[np.asarray(w, np.float32) for w in step]
                                 for step in result["weights"]],
            [np.asarray(w, np.float32) for w in result["state"]])
    assert len(mwms[1]) == STEPS
    _assert_bit_equal(local, mwms)
    assert not np.array_equal(mwms[1][0][0], mwms[1][-1][0])  # the weights did move


def _mwms_worker(out_path):
    """One worker of the MWMS test (``radam-dist launch --workers 2``); worker 0 writes."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    exchange, weights, state, optimizer = _make_run(2, "ranger", strategy=strategy)
    result = {"exchange": exchange,
              "sparse_index_bytes": {str(k): v for k, v in
                                     optimizer.inner_optimizer._state_layout
                                     .sparse_index_bytes.items()},
              "weights": [[np.asarray(w).tolist() for w in step] for step in weights],
              "state": [np.asarray(w).tolist() for w in state]}
    if json.loads(os.environ["TF_CONFIG"])["task"]["index"] == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


def test_clipnorm_takes_all_reduce_and_slice():
    assert _run(2, clipnorm=1.0)[0] == zero.ALL_REDUCE_SLICE


def test_fused_local_shard_is_bit_equal_to_the_per_variable_update(monkeypatch):
    """amsgrad here; without it the two-replica test above compares the compiled local
    update with the per-variable update of all-reduce+slice."""
    fused_run = _run(2, amsgrad=True)
    monkeypatch.setenv("RADAM_DIST_FUSED", "0")
    plain = _run(2, amsgrad=True)
    assert any(k[0] == "radam-rows" for k in fused_run[3]._fused_compiled)  # chunks ran
    assert not plain[3].__dict__.get("_fused_compiled")
    _assert_bit_equal(fused_run, plain)


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
    # back: the changes of at most a shard's rows (12 here) with their indices
    changed = 12 * (row + index)
    assert (local["reduce"], local["gather"]) == (p // 2 + entries, p // 2 + changed)
    sliced = zero.bytes_sent_per_replica(optimizer, zero.ALL_REDUCE_SLICE, sparse_rows=k)
    # the Embedding's touched rows travel (with their indices), not its whole shard
    assert (sliced["reduce"], sliced["gather"]) == (g + entries, p // 2 + changed)
    assert local["unsharded"] == sliced["unsharded"] == g + entries
    assert local["total"] == local["reduce"] + local["gather"]


if __name__ == "__main__":
    if sys.argv[1:] == ["four"]:
        print(json.dumps(_four_replicas()))
    elif sys.argv[1:2] == ["mwms"]:
        _mwms_worker(sys.argv[2])
