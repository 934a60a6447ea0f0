"""The fused step under MirroredStrategy and MultiWorkerMirroredStrategy gives the bits of the
per-variable step.

Under a mirrored strategy each local device updates its own copies of the dense variables in
compiled chunks of its own (``fused.mirrored_devices``); the Embedding's sparse gradient stays
on the per-variable path in the same step. The reference is ``RADAM_DIST_FUSED=0``
(``extended.update`` per variable, one TF op at a time). Compared as float32 bit patterns:
every replica's copy of every model variable and of every optimizer variable (m, v, vhat,
Lookahead's slow weights, the step count) after 7 steps with weight decay (biases excluded),
amsgrad and two Lookahead synchronisations, through ``strategy.run`` in a tf.function and
through ``model.fit``.

Under a single-process MirroredStrategy the dense gradients' cross-replica sum runs in the
step's own graph (``gradient_sums.all_reduce_or_defer``; the fused chunks add the replicas'
gradients): bit for bit Keras' ring all-reduce at N=2 (``RADAM_DIST_INGRAPH_SUM=0``), also
behind the accumulation gate; clipping keeps Keras' all-reduce; N=4 to round-off.

Under MWMS the large dense gradients are all-reduced one by one
(``gradient_sums.all_reduce_large_apart``): bit for bit Keras' single pack at N=2
(``RADAM_DIST_ALL_REDUCE_SPLIT=0``), in the same two-worker run as the fused check.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import tensorflow as tf

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distribute_scripts"))
import cluster_helpers as ch  # noqa: E402
import fused_bits  # noqa: E402

import radam_dist  # noqa: E402
from radam_dist import fused  # noqa: E402
from radam_dist.distribute import gradient_sums  # noqa: E402


def _assert_fused_matches_plain(name, case, expected_devices):
    """The fused runs, on the one-pass kernel and on XLA chunks, give the per-variable bits;
    the kernel served the dense updates in the first (it is built on every CI machine) and
    none in the second."""
    assert case["plain_calls"] == 0, f"{name}: RADAM_DIST_FUSED=0 must stay per-variable"
    assert case["devices"] == sorted(expected_devices), (
        f"{name}: the fused update must run once per local device, placed there")
    assert case["fused_native"] > 0, f"{name}: the one-pass kernel served no update"
    assert case["xla_native"] == 0, f"{name}: RADAM_DIST_NATIVE=0 must keep to XLA chunks"
    plain = case["plain"]
    for label in ("fused", "xla"):
        assert len(plain) == len(case[label]) > 0
        for i, (a, b) in enumerate(zip(plain, case[label])):
            assert a == b, f"{name} ({label}): array {i} differs in its bits"


@pytest.mark.timeout(180)
def test_mirrored_fused_step_is_bit_for_bit_the_per_variable_step():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "conftest.py makes two logical CPUs"
    strategy = tf.distribute.MirroredStrategy(devices)
    # Lookahead(RectifiedAdam): RectifiedAdam's step and the synchronisation, both fused.
    results = fused_bits.fused_and_plain(strategy, [("loop", "ranger"), ("fit", "ranger")])
    assert sorted(results) == ["fit-ranger", "loop-ranger"]
    for name, case in results.items():
        _assert_fused_matches_plain(name, case, strategy.extended.worker_devices)
    # The comparison can fail: the runs trained (the state moved from its start).
    first = results["loop-ranger"]["fused"]
    assert first[0] != fused_bits.bits([fused_bits.build_model().weights[0].numpy()])[0]


def test_only_a_mirrored_strategys_cross_replica_context_takes_the_per_device_path(
        monkeypatch):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():  # cross-replica context (as inside the optimizer's merge_call)
        plan = radam_dist.RectifiedAdam().step_plan()
        assert plan.mirrored_devices(strategy) == tuple(strategy.extended.worker_devices)
    in_replica = strategy.run(lambda: tf.constant(plan.mirrored_devices(strategy) is None))
    assert all(bool(x) for x in strategy.experimental_local_results(in_replica))
    assert plan.mirrored_devices(None) is None
    assert plan.mirrored_devices(tf.distribute.get_strategy()) is None  # the default one
    monkeypatch.setenv(fused.ENV_SWITCH, "0")  # read when an optimizer (its plan) is made
    with strategy.scope():
        assert plan.mirrored_devices(strategy) is not None
        assert radam_dist.RectifiedAdam().step_plan().mirrored_devices(strategy) is None


@pytest.fixture(scope="module")
def mwms_results(tmp_path_factory):
    """One MWMS x2 run of fused_bits.py (two worker processes): per worker its JSON."""
    out = tmp_path_factory.mktemp("mwms") / "bits.json"
    code, log = ch.launch(2, 0, [str(ch.SCRIPTS / "fused_bits.py"), "--out", str(out),
                                 "--split-check"], 200)
    assert code == 0, log[-4000:]
    return [json.loads(pathlib.Path(f"{out}.worker-{task}").read_text()) for task in (0, 1)]


@pytest.mark.timeout(220)
def test_multi_worker_mirrored_fused_step_is_bit_for_bit_the_per_variable_step(mwms_results):
    for task in (0, 1):
        result = mwms_results[task]
        assert result["num_replicas"] == 2
        assert sorted(result["cases"]) == ["loop-ranger"]
        for name, case in result["cases"].items():
            _assert_fused_matches_plain(
                f"worker {task} {name}", case,
                [f"/job:worker/replica:0/task:{task}/device:CPU:0"])


@pytest.mark.timeout(220)
def test_multi_worker_split_all_reduce_is_bit_for_bit_keras_single_pack(mwms_results):
    """gradient_sums.all_reduce_large_apart (each large dense gradient in a collective of its own;
    here every dense one, SPLIT_MIN_BYTES = 0, the Embedding's IndexedSlices through Keras)
    against Keras' single pack (RADAM_DIST_ALL_REDUCE_SPLIT=0): the same bits at N=2 on
    every copy of every variable and optimizer variable after 7 steps."""
    for task in (0, 1):
        split = mwms_results[task]["split"]
        assert split["split_counted"] and all(n == 4 for n in split["split_counted"]), (
            "the 4 dense gradients (2 kernels, 2 biases) must go one by one")
        assert split["single_counted"] == [], "RADAM_DIST_ALL_REDUCE_SPLIT=0 keeps Keras' pack"
        assert len(split["split"]) == len(split["single"]) > 0
        for i, (a, b) in enumerate(zip(split["split"], split["single"])):
            assert a == b, f"worker {task}: array {i} differs in its bits"
        initial = fused_bits.bits([fused_bits.build_model().weights[0].numpy()])[0]
        assert split["split"][0] != initial  # it trained: the comparison can fail


# -- the gradients' cross-replica sum in the step's own graph (StepPlan.sums_in_graph) --------


@pytest.fixture
def deferred_spy(monkeypatch):
    """Records, per traced step, which gradients RectifiedAdam left unreduced for the in-graph
    sum (``gradient_sums.all_reduce_or_defer``'s second result)."""
    real, seen = gradient_sums.all_reduce_or_defer, []

    def spy(*args, **kwargs):
        pairs, deferred = real(*args, **kwargs)
        seen.append(deferred)
        return pairs, deferred

    monkeypatch.setattr(gradient_sums, "all_reduce_or_defer", spy)
    return seen


def _replicas_agree(state):
    # state_bits lists each variable's copies replica after replica (two replicas here).
    return all(state[i] == state[i + 1] for i in range(0, len(state), 2))


@pytest.mark.timeout(120)
def test_mirrored_in_graph_sum_is_bit_for_bit_keras_all_reduce(monkeypatch, deferred_spy):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    data = fused_bits.make_data()
    # Lookahead(RectifiedAdam), 7 steps, 2 syncs; the per-variable path (RADAM_DIST_FUSED=0)
    # takes the same sum: the first test here compares it with this fused one.
    monkeypatch.setenv(gradient_sums.INGRAPH_SWITCH, "0")
    ring = fused_bits.loop(strategy, "ranger", data)
    assert deferred_spy and not any(any(d) for d in deferred_spy), "switch off: Keras' all-reduce"
    monkeypatch.setenv(gradient_sums.INGRAPH_SWITCH, "1")
    del deferred_spy[:]
    own = fused_bits.loop(strategy, "ranger", data)
    # The Embedding's sparse gradient keeps Keras' all-reduce; the 4 dense ones sum in-graph.
    assert deferred_spy and all(d == (False, True, True, True, True) for d in deferred_spy), (
        deferred_spy)
    assert len(own) == len(ring) > 0
    for i, (a, b) in enumerate(zip(ring, own)):
        assert a == b, f"array {i} differs in its bits"
    assert _replicas_agree(own)


def _small_run(strategy, kwargs):
    shapes = [(30, 20), (20,)]
    with strategy.scope():
        variables = [tf.Variable(tf.random.stateless_normal(s, (1, i))) for i, s in enumerate(shapes)]
        optimizer = radam_dist.RectifiedAdam(1e-2, weight_decay=0.01, **kwargs)
    grads = strategy.experimental_distribute_values_from_function(
        lambda ctx: [0.3 * tf.random.stateless_normal(s, (ctx.replica_id_in_sync_group, 7))
                     for s in shapes])

    @tf.function
    def step(g):
        strategy.run(lambda g: optimizer.apply_gradients(zip(g, variables)), args=(g,))

    for _ in range(4):
        step(grads)
    return fused_bits.bits(
        [c.numpy() for v in variables + [optimizer.iterations.value]
         for c in strategy.experimental_local_results(v)])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kwargs, deferred", [
    ({"clipnorm": 0.05}, False),  # clipping needs the summed gradient: Keras' all-reduce
    ({"accumulation_steps": 2}, True),  # the gate's apply branch sums in-graph
])
def test_in_graph_sum_with_clipping_and_the_gate(monkeypatch, deferred_spy, kwargs, deferred):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    monkeypatch.setenv(gradient_sums.INGRAPH_SWITCH, "0")
    ring = _small_run(strategy, kwargs)
    monkeypatch.setenv(gradient_sums.INGRAPH_SWITCH, "1")
    del deferred_spy[:]
    own = _small_run(strategy, kwargs)
    assert deferred_spy and all(d == (True, True) if deferred else not any(d)
                                for d in deferred_spy), deferred_spy
    assert own == ring
    assert _replicas_agree(own)


_FOUR_REPLICAS = r"""
import json, os
import numpy as np
import tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 4)
from radam_dist import RectifiedAdam
from radam_dist.distribute import gradient_sums
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
shapes = [(64, 33), (33,)]
def run(in_graph):
    os.environ[gradient_sums.INGRAPH_SWITCH] = in_graph
    with strategy.scope():
        vs = [tf.Variable(tf.random.stateless_normal(s, (1, i))) for i, s in enumerate(shapes)]
        opt = RectifiedAdam(1e-2)
    grads = strategy.experimental_distribute_values_from_function(lambda ctx: [
        tf.random.stateless_normal(s, (ctx.replica_id_in_sync_group, 7)) for s in shapes])
    @tf.function
    def step(g):
        strategy.run(lambda g: opt.apply_gradients(zip(g, vs)), args=(g,))
    for _ in range(8):
        step(grads)
    return [[c.numpy() for c in strategy.experimental_local_results(v)] for v in vs]
ring, own = run("0"), run("1")
print("RESULT", json.dumps(dict(
    copies_equal=all((c == cs[0]).all() for cs in own for c in cs),
    max_abs=max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(ring, own)),
    differ=sum(int((a[0] != b[0]).sum()) for a, b in zip(ring, own)))))
"""


@pytest.mark.timeout(150)
def test_four_replicas_in_graph_sum_agrees_with_the_ring_to_round_off():
    """N=4: the replica-order sum ((g0 + g1) + g2) + g3 rounds differently from the ring's;
    after 8 steps (lr 1e-2, unit gradients) a few elements differ by at most ~5e-7
    (measured: 81 of 2,145, 4.8e-7), every replica's copy still bit-identical."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _FOUR_REPLICAS], capture_output=True, text=True,
                          timeout=140, env=env, cwd=str(pathlib.Path(__file__).parent.parent))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    result = json.loads(line[0][len("RESULT "):])
    assert result["copies_equal"]
    assert result["max_abs"] <= 2e-6, result
