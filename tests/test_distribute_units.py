"""Fast in-process checks of radam_dist.distribute's pieces (no cluster)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from radam_dist.distribute import pss
from radam_dist.launch import cluster


def _sharded(rows=(3, 2), cols=2):
    return pss.ShardedVariable([tf.Variable(tf.ones([r, cols])) for r in rows])


def test_split_gradient_dense_and_sparse_by_shard_rows():
    var = _sharded()
    dense = tf.reshape(tf.range(10.0), [5, 2])
    first, second = pss.gradient_per_shard(dense, var)
    np.testing.assert_array_equal(first, dense[:3])
    np.testing.assert_array_equal(second, dense[3:])
    sparse = tf.IndexedSlices(tf.constant([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]),
                              tf.constant([4, 0, 3]))
    first, second = pss.gradient_per_shard(sparse, var)
    assert first.indices.numpy().tolist() == [0] and first.values.numpy()[0, 0] == 2.0
    assert second.indices.numpy().tolist() == [1, 0]  # rows 4 and 3, from the shard's start
    np.testing.assert_array_equal(second.values.numpy()[:, 0], [1.0, 3.0])


def test_split_sharded_leaves_plain_variables_alone():
    plain = tf.Variable(tf.zeros([2]))
    grads, variables = pss.expand_sharded_pairs([tf.ones([2])], [plain])
    assert variables == [plain] and len(grads) == 1
    var = _sharded()
    grads, variables = pss.expand_sharded_pairs([None, tf.ones([2])], [var, plain])
    assert grads[:2] == [None, None] and variables == list(var.variables) + [plain]
    assert pss.expand_sharded([var, plain]) == list(var.variables) + [plain]


def test_local_cluster_spec_and_tf_config():
    spec = cluster.local_cluster_spec(workers=2, ps=1)
    assert [len(spec[k]) for k in ("chief", "worker", "ps")] == [1, 2, 1]
    addresses = [a for tasks in spec.values() for a in tasks]
    assert len(set(addresses)) == 4
    config = json.loads(cluster.tf_config(spec, "worker", 1))
    assert config["task"] == {"type": "worker", "index": 1} and config["cluster"] == spec
    assert "chief" not in cluster.local_cluster_spec(workers=2)
    with pytest.raises(ValueError, match="at least one worker"):
        cluster.local_cluster_spec(workers=0)
    with pytest.raises(ValueError, match="no task ps:3"):
        cluster.tf_config(spec, "ps", 3)


def test_legacy_rectified_adam_config_round_trip():
    from radam_dist.optimizers.legacy_keras import LegacyRectifiedAdam

    opt = LegacyRectifiedAdam(0.01, weight_decay=0.1, amsgrad=True, total_steps=100)
    config = opt.get_config()
    assert LegacyRectifiedAdam.from_config(config).get_config() == config


@pytest.mark.parametrize("kwargs, message", [
    ({"beta_1": 1.0}, "beta_1"), ({"beta_2": -0.1}, "beta_2"),
    ({"total_steps": 2.5}, "total_steps"), ({"warmup_proportion": 1.5}, "warmup_proportion"),
])
def test_legacy_rectified_adam_refuses_what_rectified_adam_refuses(kwargs, message):
    from radam_dist import RectifiedAdam
    from radam_dist.optimizers.legacy_keras import LegacyRectifiedAdam

    for optimizer in (RectifiedAdam, LegacyRectifiedAdam):
        with pytest.raises(ValueError, match=message):
            optimizer(0.01, **kwargs)


def test_the_former_legacy_keras_path_still_imports_and_says_where_it_moved():
    """README's earlier path of LegacyRectifiedAdam forwards to its new module, with a
    DeprecationWarning naming it (in a fresh interpreter: tf_keras is imported there)."""
    import subprocess
    import sys

    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    from radam_dist.distribute.legacy_keras import LegacyRectifiedAdam as Old\n"
            "from radam_dist.optimizers.legacy_keras import LegacyRectifiedAdam as New\n"
            "assert Old is New\n"
            "assert any(issubclass(w.category, DeprecationWarning) and\n"
            "           'radam_dist.optimizers.legacy_keras' in str(w.message) for w in seen)\n"
            "print('OK')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-2000:]
