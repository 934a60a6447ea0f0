"""Replica-sharded optimizer state (ZeRO-1, ``shard_optimizer_state=True``).

* Same trajectory as one device (and so as unsharded) under MirroredStrategy (2 logical
  CPUs, in test_distribute_aggregation's run) and MWMS (2 processes, in
  test_distribute_strategies' run), for RectifiedAdam and Lookahead(RectifiedAdam);
* each replica holds 1/N of m, v and slow: bytes per replica measured here for N = 4, 2, 1;
* a checkpoint of Lookahead(RectifiedAdam) (m, v and slow weights sharded) written with 4
  replicas restores with 1, whose checkpoint restores with 2, and the 10 steps (Lookahead
  syncs at 3, 6 and 9) are still the one-device trajectory.
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
