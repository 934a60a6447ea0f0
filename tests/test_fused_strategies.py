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
"""

import json
import pathlib
import sys

import pytest
import tensorflow as tf

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distribute_scripts"))
import cluster_helpers as ch  # noqa: E402
import fused_bits  # noqa: E402

from radam_dist import fused  # noqa: E402


def _assert_fused_matches_plain(name, case, expected_devices):
    assert case["plain_calls"] == 0, f"{name}: RADAM_DIST_FUSED=0 must stay per-variable"
    assert case["devices"] == sorted(expected_devices), (
        f"{name}: the fused update must run once per local device, placed there")
    plain, fast = case["plain"], case["fused"]
    assert len(plain) == len(fast) > 0
    for i, (a, b) in enumerate(zip(plain, fast)):
        assert a == b, f"{name}: array {i} differs in its bits"


@pytest.mark.timeout(120)
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
        assert fused.mirrored_devices(strategy) == tuple(strategy.extended.worker_devices)
    in_replica = strategy.run(lambda: tf.constant(fused.mirrored_devices(strategy) is None))
    assert all(bool(x) for x in strategy.experimental_local_results(in_replica))
    assert fused.mirrored_devices(None) is None
    assert fused.mirrored_devices(tf.distribute.get_strategy()) is None  # the default one
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    with strategy.scope():
        assert fused.mirrored_devices(strategy) is None


@pytest.mark.timeout(180)
def test_multi_worker_mirrored_fused_step_is_bit_for_bit_the_per_variable_step(tmp_path):
    out = tmp_path / "bits.json"
    code, log = ch.launch(2, 0, [str(ch.SCRIPTS / "fused_bits.py"), "--out", str(out)], 170)
    assert code == 0, log[-4000:]
    for task in (0, 1):
        result = json.loads(pathlib.Path(f"{out}.worker-{task}").read_text())
        assert result["num_replicas"] == 2
        assert sorted(result["cases"]) == ["loop-ranger"]
        for name, case in result["cases"].items():
            _assert_fused_matches_plain(
                f"worker {task} {name}", case,
                [f"/job:worker/replica:0/task:{task}/device:CPU:0"])
