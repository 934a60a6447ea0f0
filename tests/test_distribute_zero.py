"""Replica-sharded optimizer state (ZeRO-1, ``shard_optimizer_state=True``).

* Same trajectory as one device (and so as unsharded) under MirroredStrategy (2 logical
  CPUs, in test_distribute_aggregation's run) and MWMS (2 processes, in
  test_distribute_strategies' run), for RectifiedAdam and Lookahead(RectifiedAdam);
* each replica holds 1/N of m, v and slow: bytes per replica measured here for N = 4, 2, 1;
* a checkpoint of Lookahead(RectifiedAdam) (m, v and slow weights sharded) written with 4
  replicas restores with 1, whose checkpoint restores with 2, and the 10 steps (Lookahead
  syncs at 3, 6 and 9) are still the one-device trajectory;
* under MWMS (2 workers) get_weights / get_slot of Lookahead(RectifiedAdam) are the unsharded
  state and the .keras file saved there loads in a plain process and continues the trajectory;
* several MultiWorkerMirroredStrategy objects in one pair of worker processes (real
  tf.distribute servers via ``radam-dist launch``, TF_CONFIG): a new strategy per case, ZeRO,
  Lookahead and the aggregation options, each the one-device trajectory (TensorFlow reuses
  collective keys across strategy objects; radam_dist/distribute/collective_keys.py).

Whole-state views of the sharded slots (get_weights, get_slot, .keras, checkpoints across ZeRO
on / off) are tested in-process in test_state_layouts.py.
"""

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "distribute_scripts"))
import cluster_helpers as ch  # noqa: E402

SCRIPT = str(ch.SCRIPTS / "zero_checkpoint.py")
# The model: Embedding 24x4, Dense kernel 16x1, bias 1 -> 113 float32 parameters; with
# Lookahead(RectifiedAdam) there are three slots per parameter: m, v and the slow weight.
UNSHARDED_BYTES = 3 * 113 * 4


@pytest.mark.timeout(150)
def test_checkpoint_restores_with_a_different_number_of_replicas(tmp_path):
    phases = [(4, 0, 4), (1, 4, 7), (2, 7, 10)]
    results, restore = [], None
    for n, first, last in phases:
        out = tmp_path / f"n{n}.json"
        argv = [sys.executable, SCRIPT, "--replicas", str(n), "--first", str(first),
                "--last", str(last), "--save", str(tmp_path / f"ckpt{n}"), "--out", str(out),
                "--kind", "ranger"]
        if restore:
            argv += ["--restore", restore]
        code, log = ch.run(argv, 60)
        assert code == 0, log[-4000:]
        results.append(json.loads(out.read_text()))
        restore = results[-1]["checkpoint"]
    reference = results[0]["reference"]
    trajectory = [step for r in results for step in r["trajectory"]]
    assert len(trajectory) == len(reference) == 10
    for k, (ref_step, step) in enumerate(zip(reference, trajectory)):
        for ref, got in zip(ref_step, step):
            np.testing.assert_allclose(got, ref, rtol=ch.RTOL, atol=ch.ATOL,
                                       err_msg=f"step {k + 1}")
    per_replica = {n: r["state_bytes_per_replica"] for (n, _, _), r in zip(phases, results)}
    assert per_replica[1] == UNSHARDED_BYTES
    # rows split in ceil(rows / N) chunks: 24/4, 16/4 and the 1-row bias padded to 1 row each
    assert per_replica[4] == 3 * (6 * 4 + 4 + 1) * 4
    assert per_replica[2] == 3 * (12 * 4 + 8 + 1) * 4


@pytest.mark.timeout(200)
def test_several_mwms_strategies_in_one_process(tmp_path):
    out = tmp_path / "several.json"
    code, log = ch.launch(2, 0, [str(ch.SCRIPTS / "trajectory.py"), "--strategy", "mwms",
                                 "--fresh-strategy", "--modes", "loop", "--variants",
                                 "zero,fp16,acc4", "--out", str(out)], 190)
    assert code == 0, log[-4000:]
    compressed = ch.split_off(out, "fp16")  # float16 all-reduce: bounded, not round-off
    for case in compressed.values():
        assert 0.0 < ch.max_deviation(case) < 5e-4
    cases = [f"loop-{k}-{v}" for k in ("radam", "ranger") for v in ("zero", "acc4")]
    result, _ = ch.assert_same_trajectories(out, cases)
    assert result["num_replicas"] == 2
    assert result["strategies"] == 6  # one MWMS object per case, in each worker process


@pytest.mark.timeout(200)
def test_mwms_zero_state_is_whole_in_get_weights_get_slot_and_keras_files(tmp_path):
    """Two MWMS workers, ZeRO-1 Lookahead(RectifiedAdam): get_weights / get_slot after 4 steps
    are the unsharded one-device state; the .keras file saved there loads in this plain
    process (no strategy) and the next 6 steps are the one-device trajectory."""
    import keras
    import tensorflow as tf

    import trajectory as t

    out, path = tmp_path / "state.json", tmp_path / "zero.keras"
    code, log = ch.launch(2, 0, [str(ch.SCRIPTS / "zero_state_mwms.py"), "--kind", "ranger",
                                 "--out", str(out), "--keras", str(path)], 190)
    assert code == 0, log[-4000:]
    result = json.loads(out.read_text())
    assert result["num_replicas"] == 2 and result["layout"] == "replica-sharded"
    assert result["names"] == result["reference_names"] == ["m", "v", "slow"]
    assert len(result["weights"]) == len(result["reference_weights"]) == 1 + 3 * 3
    for got, want in zip(result["weights"], result["reference_weights"]):
        np.testing.assert_allclose(got, want, rtol=ch.RTOL, atol=ch.ATOL)
    for name, slots in result["reference_slots"].items():
        for got, want in zip(result["slots"][name], slots):
            np.testing.assert_allclose(got, want, rtol=ch.RTOL, atol=ch.ATOL, err_msg=name)
    model = keras.models.load_model(path)
    optimizer = model.optimizer
    for got, want in zip(optimizer.get_weights(), result["reference_weights"]):
        np.testing.assert_allclose(got, want, rtol=ch.RTOL, atol=ch.ATOL)
    ids, feats, y = t.make_data()
    for k in range(4, t.STEPS):
        sl = slice(k * t.GLOBAL_BATCH, (k + 1) * t.GLOBAL_BATCH)
        with tf.GradientTape() as tape:
            loss = t.loss_fn(model, ids[sl], feats[sl], y[sl])
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))
        for got, want in zip(t.flat_weights(model), result["trajectory"][k]):
            np.testing.assert_allclose(got, want, rtol=ch.RTOL, atol=ch.ATOL,
                                       err_msg=f"step {k + 1}")
