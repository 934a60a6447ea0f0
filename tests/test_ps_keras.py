"""model.fit through the parameter servers: the demo run (2 shard processes, 2 Keras workers).

Both workers train with ParameterServerOptimizer in sync mode; the embedding table is split by
rows across the shards and its gradients travel as sparse rows. Afterwards both workers hold
exactly the servers' parameters, every step was applied on both shards, the loss went down,
and SIGTERM left a checkpoint at the final version on each shard.
"""

import pytest

from examples.ps import demo


@pytest.mark.timeout(240)
def test_model_fit_through_two_shards(tmp_path):
    lines = demo.run(str(tmp_path))
    assert len(lines) == 4 and "split by rows: True" in lines[0]
    import json

    for i in range(2):
        r = json.loads((tmp_path / f"worker-{i}.json").read_text())
        assert r["versions"] == [demo.STEPS, demo.STEPS]
        assert r["max_abs_diff_to_servers"] == 0.0
        assert r["loss_after"] < 0.8 * r["loss_before"], r
    for shard in (0, 1):
        assert (tmp_path / f"ckpt{shard}" / f"ckpt-{demo.STEPS:012d}.radps").exists()
