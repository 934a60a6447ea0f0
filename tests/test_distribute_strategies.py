"""RectifiedAdam and Lookahead(RectifiedAdam) under real tf.distribute strategies give the
one-device trajectory on the global batch (dense Dense gradients and sparse Embedding
gradients), checked after every one of 10 steps.

* MirroredStrategy over two logical CPU devices: custom loop and model.fit;
* MultiWorkerMirroredStrategy, two worker processes on loopback started by
  ``radam-dist launch`` with TF_CONFIG: custom loop and model.fit (with
  ``enable_multi_worker_fit``); optimizer slots created lazily inside the first step; the
  custom loop also with accumulation_steps=4, skip_nonfinite (NaN on one worker),
  shard_optimizer_state (ZeRO-1) and the float16 all-reduce;
* tf_keras (TF_USE_LEGACY_KERAS=1) model.fit under MWMS with LegacyRectifiedAdam;
* ParameterServerStrategy: real tf.distribute.Server processes for two workers and two
  parameter servers, a ClusterCoordinator on the chief.
"""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distribute_scripts"))
import cluster_helpers as ch  # noqa: E402

TRAJECTORY = str(ch.SCRIPTS / "trajectory.py")
ALL_CASES = ["loop-radam", "fit-radam", "loop-ranger", "fit-ranger"]


@pytest.mark.timeout(120)
def test_mirrored_two_logical_cpus(tmp_path):
    out = tmp_path / "mirrored.json"
    code, log = ch.run(
        [sys.executable, TRAJECTORY, "--strategy", "mirrored", "--out", str(out)], 110)
    assert code == 0, log[-4000:]
    result, _ = ch.assert_same_trajectories(out, ALL_CASES)
    assert result["num_replicas"] == 2


@pytest.mark.timeout(150)
def test_multi_worker_mirrored_two_processes(tmp_path):
    out = tmp_path / "mwms.json"
    code, log = ch.launch(2, 0, [TRAJECTORY, "--strategy", "mwms", "--variants",
                                 "plain,acc4,skipnan,zero,fp16", "--out", str(out)], 140)
    assert code == 0, log[-4000:]
    assert "[worker:0]" in log and "[worker:1]" in log
    gated = [f"loop-{k}-{v}" for k in ("radam", "ranger") for v in ("acc4", "skipnan", "zero")]
    compressed = ch.split_off(out, "fp16")  # float16 all-reduce: bounded, not round-off
    assert sorted(compressed) == ["loop-radam-fp16", "loop-ranger-fp16"]
    for case in compressed.values():
        assert 0.0 < ch.max_deviation(case) < 5e-4
    result, _ = ch.assert_same_trajectories(out, ALL_CASES + gated)
    assert result["num_replicas"] == 2
    for kind in ("radam", "ranger"):
        skip = result["cases"][f"loop-{kind}-skipnan"]
        assert skip["unchanged_by_nan_step"] and skip["skipped_steps"] == 1
        zero = result["cases"][f"loop-{kind}-zero"]  # ZeRO-1 on 2 workers: half of each slot
        slots = 2 if kind == "radam" else 3  # m, v (+ Lookahead's slow weights)
        assert zero["state_bytes_per_replica"] == slots * (12 * 4 + 8 + 1) * 4


@pytest.mark.timeout(150)
def test_parameter_server_two_workers_two_ps(tmp_path):
    out = tmp_path / "pss.json"
    code, log = ch.launch(2, 2, [TRAJECTORY, "--strategy", "pss", "--modes", "loop",
                                 "--out", str(out)], 140)
    assert code == 0, log[-4000:]
    result, _ = ch.assert_same_trajectories(out, ["loop-radam", "loop-ranger"])
    assert result["num_replicas"] == 1
    for case in result["cases"].values():
        devices = {d for entry in case["placement"].values() for ds in entry.values() for d in ds}
        assert all("/job:ps/" in d for d in devices), devices


@pytest.mark.timeout(150)
def test_parameter_server_sharded_slots_live_with_their_shards(tmp_path):
    """PSS with a MinSizePartitioner: the Embedding table and the Dense kernel are split over
    both parameter servers; m, v and Lookahead's slow weights are split the same way and each
    slot shard lives on its variable shard's parameter server; training still matches."""
    out = tmp_path / "pss_sharded.json"
    code, log = ch.launch(2, 2, [TRAJECTORY, "--strategy", "pss", "--modes", "loop",
                                 "--partition", "--optimizers", "ranger", "--out", str(out)], 140)
    assert code == 0, log[-4000:]
    result, _ = ch.assert_same_trajectories(out, ["loop-ranger"])
    placement = result["cases"]["loop-ranger"]["placement"]
    sharded = {path: entry for path, entry in placement.items() if len(entry["variable"]) > 1}
    assert {p.split("/")[0] for p in sharded} == {"embedding", "dense"}, placement
    for path, entry in sharded.items():
        assert sorted(entry) == ["m", "slow", "v", "variable"], entry
        assert len(set(entry["variable"])) == 2, entry  # shards on two different servers
        for slot in ("m", "v", "slow"):
            assert entry[slot] == entry["variable"], (path, slot, entry)


@pytest.mark.timeout(150)
def test_tf_keras_fit_under_multi_worker_mirrored(tmp_path):
    """TF_USE_LEGACY_KERAS=1: a tf_keras model.fit on a two-worker MWMS cluster with
    LegacyRectifiedAdam matches the one-device fit, which matches Keras 3 RectifiedAdam."""
    out = tmp_path / "legacy.json"
    code, log = ch.launch(2, 0, [str(ch.SCRIPTS / "legacy_fit.py"), "--out", str(out)], 140,
                          env={"TF_USE_LEGACY_KERAS": "1"})
    assert code == 0, log[-4000:]
    result, _ = ch.assert_same_trajectories(out, ["fit-legacy", "keras3-vs-legacy"])
    assert result["num_replicas"] == 2
