"""The step plan (radam_dist/step/plan.py): what ``optimizer.step_plan()`` says, the one INFO
line per build, and that the environment's switches are read once, when the optimizer is made.

The bits each path computes are proven elsewhere (test_fused_equivalence.py,
test_fused_strategies.py, test_zero_reduce_scatter.py); here the question is whether the plan
names the path a step takes, and why.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf

import radam_dist
from radam_dist import executor, native


def _devices():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(devices) == 2, "conftest.py makes two logical CPUs"
    return devices


def _step(optimizer, variables, sparse_index=None):
    grads = [tf.ones_like(v) for v in variables]
    if sparse_index is not None:
        v = variables[sparse_index]
        grads[sparse_index] = tf.IndexedSlices(tf.ones([2] + v.shape[1:].as_list(), v.dtype),
                                               tf.constant([0, 2]), tf.constant(v.shape))
    optimizer.apply_gradients(zip(grads, variables))


def test_without_a_strategy_each_group_names_its_kernel_and_why():
    variables = [tf.Variable(np.ones((8, 4), np.float32)), tf.Variable(np.ones(4, np.float16)),
                 tf.Variable(np.ones((10, 4), np.float32))]
    optimizer = radam_dist.RectifiedAdam(0.01)
    _step(optimizer, variables, sparse_index=2)
    plan = optimizer.step_plan()
    text = plan.describe()
    assert text.splitlines()[0] == "RectifiedAdam 'RectifiedAdam' without a strategy"
    assert "state: replicated" in text
    assert "gradients: none (one replica" in text
    groups = {g.what: g for g in plan.groups()}
    assert groups["dense float16"].kernel == "xla-chunks"
    assert "float32 and float64" in groups["dense float16"].why
    assert groups["dense float32"].count == 1  # the table's gradient was sparse
    assert groups["sparse gradients"].kernel == "per-variable"
    if native.library() is not None:  # built on every CI machine; else the plan says why not
        assert groups["dense float32"].kernel == "native"
    assert str(plan) == text  # print(optimizer.step_plan())


def test_the_plan_is_what_the_step_runs(monkeypatch):
    """The kernel the plan names for float32 is the one that updates the variables."""
    native_calls, dense_calls = [], []
    real_native, real_dense = native.apply_dense, executor.update_dense
    monkeypatch.setattr(native, "apply_dense", lambda u: (native_calls.append(u), real_native(u)))
    monkeypatch.setattr(executor, "update_dense",
                        lambda updates, **k: (dense_calls.append(len(updates)),
                                              real_dense(updates, **k)))
    variables = [tf.Variable(np.ones((8, 4), np.float32))]
    optimizer = radam_dist.RectifiedAdam(0.01)
    _step(optimizer, variables)
    kernel = {g.what: g.kernel for g in optimizer.step_plan().groups()}["dense float32"]
    assert dense_calls == [1]
    assert bool(native_calls) == (kernel == "native"), (kernel, native.unavailable_reason())


@pytest.mark.parametrize("switches, kernel", [({"RADAM_DIST_NATIVE": "0"}, "xla-chunks"),
                                              ({"RADAM_DIST_FUSED": "0"}, "per-variable")])
def test_switches_are_read_once_when_the_optimizer_is_made(monkeypatch, switches, kernel):
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    variables = [tf.Variable(np.ones((8, 4), np.float32))]
    switched = radam_dist.RectifiedAdam(0.01)
    for name in switches:
        monkeypatch.delenv(name)
    default = radam_dist.RectifiedAdam(0.01)
    native_calls = []
    real = native.apply_dense
    monkeypatch.setattr(native, "apply_dense", lambda u: (native_calls.append(u), real(u)))
    _step(switched, variables)  # the environment has changed back since: the plan has not
    assert native_calls == []
    groups = {g.what: g for g in switched.step_plan().groups()}
    assert groups["dense float32"].kernel == kernel
    assert next(iter(switches)) in groups["dense float32"].why
    assert default.step_plan().switches.fused and default.step_plan().switches.native


def test_mirrored_strategy_exchanges_and_zero(caplog):
    strategy = tf.distribute.MirroredStrategy(_devices())
    with strategy.scope():
        plain = radam_dist.RectifiedAdam(0.01)
        clipped = radam_dist.RectifiedAdam(0.01, clipnorm=1.0)
        compressed = radam_dist.RectifiedAdam(0.01, all_reduce_dtype="float16")
        sharded = radam_dist.RectifiedAdam(0.01, shard_optimizer_state=True)
    assert plain.step_plan().describe().splitlines()[0] == (
        "RectifiedAdam 'RectifiedAdam' under MirroredStrategy (2 replicas)")
    assert plain.step_plan().exchange(traced=False)[0] == "in-graph sum"
    assert clipped.step_plan().exchange(traced=False)[0] == "all-reduce"
    assert compressed.step_plan().exchange(traced=False)[0] == "all-reduce (float16)"
    assert sharded.step_plan().layout.kind == "replica-sharded"
    assert sharded.step_plan().zero_exchange() == (
        "local-reduce-scatter", "single-worker MirroredStrategy: in-graph reduce-scatter")
    with strategy.scope():
        variables = [tf.Variable(np.ones((8, 4), np.float32))]

    @tf.function
    def train():
        strategy.run(lambda: plain.apply_gradients([(tf.ones((8, 4)), variables[0])]))

    with caplog.at_level(logging.INFO, logger="radam_dist.step"):
        train()
        train()
    lines = [r.getMessage() for r in caplog.records if r.name == "radam_dist.step"]
    assert sum(m.startswith("step plan: ") for m in lines) == 1, lines  # one line per build
    assert any("gradients by in-graph sum" in m for m in lines), lines
    assert plain.step_plan().last_exchange[0] == "in-graph sum"


def test_lookahead_describes_its_pull_back_and_its_inner_optimizer():
    variables = [tf.Variable(np.ones((8, 4), np.float32))]
    optimizer = radam_dist.Lookahead(radam_dist.RectifiedAdam(0.01), sync_period=1)
    _step(optimizer, variables)
    text = optimizer.step_plan().describe()
    assert text.startswith("Lookahead 'Lookahead' without a strategy")
    assert "slow weights float32 (1)" in text
    assert "inner: RectifiedAdam 'RectifiedAdam' without a strategy" in text
