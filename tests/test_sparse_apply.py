"""radam_math.apply_sparse keeps tfa's arithmetic bit for bit while it touches only the table.

apply_sparse adds the gradient's rows to the decayed m and v as tensors and reads the
table's rows with sparse_read (a variable a gather or scatter touched is read by copy from
then on). The reference below is tfa's own formulation on variables: decay by assign, then
scatter_add; rows gathered from whole reads. Both must give the same bits, duplicates,
amsgrad, weight decay, float16 slots, int32/int64 indices, eagerly and in tf.function.
"""

import numpy as np
import pytest
import tensorflow as tf

from radam_dist import radam_math as rm


def _tfa_formulation(var, values, indices, m, v, vhat, s):
    dtype = s.lr.dtype
    values, indices = rm.deduplicate(rm._read(values, dtype), indices)
    rm._write(m, rm._read(m, dtype) * s.beta_1)
    rm._scatter_add(m, indices, rm._product(values, s.one_minus_beta_1, s))
    rm._write(v, rm._read(v, dtype) * s.beta_2)
    rm._scatter_add(v, indices, rm._product(values * values, s.one_minus_beta_2, s))
    if vhat is not None:
        rm._write(vhat, tf.maximum(rm._read(vhat, dtype), rm._read(v, dtype)))
    m_rows = tf.gather(rm._read(m, dtype), indices)
    v_rows = tf.gather(rm._read(v if vhat is None else vhat, dtype), indices)
    var_rows = tf.gather(rm._read(var, dtype), indices)
    rm._scatter_add(var, indices, rm._product(-s.lr, rm.direction(m_rows, v_rows, var_rows, s), s))


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
@pytest.mark.parametrize("amsgrad,weight_decay", [(False, 0.0), (True, 0.01)])
@pytest.mark.parametrize("in_function", [False, True])
def test_apply_sparse_is_bit_equal_to_the_variable_formulation(dtype, amsgrad, weight_decay,
                                                               in_function):
    rs = np.random.RandomState(3)
    rows, width = 40, 5
    start = [rs.randn(rows, width), 0.1 * rs.randn(rows, width),
             0.01 * np.abs(rs.randn(rows, width)), 0.01 * np.abs(rs.randn(rows, width))]
    ours, reference = ([tf.Variable(x.astype(dtype.as_numpy_dtype)) for x in start]
                       for _ in range(2))
    hp = rm.RAdamHyperparams(amsgrad=amsgrad)
    duplicates = 0
    for step in range(1, 9):  # steps 1-4 momentum only, 5-8 rectified (sma_threshold 5)
        index_np = rs.randint(0, rows, 12)
        duplicates += 12 - len(set(index_np))
        indices = tf.constant(index_np.astype("int64" if step % 2 else "int32"))
        values = tf.constant(rs.randn(12, width).astype(dtype.as_numpy_dtype))
        for apply, vs in ((rm.apply_sparse, ours), (_tfa_formulation, reference)):
            def update(apply=apply, vs=vs):
                s = rm.step_scalars(tf.constant(step), tf.constant(1e-2), weight_decay, hp,
                                    dtype=rm.compute_dtype(dtype),
                                    has_weight_decay=weight_decay > 0)
                apply(vs[0], values, indices, vs[1], vs[2], vs[3] if amsgrad else None, s)

            (tf.function(update) if in_function else update)()
    assert duplicates > 0, "the indices must repeat somewhere"
    assert not np.array_equal(ours[0].numpy(), start[0].astype(dtype.as_numpy_dtype))
    for a, b in zip(ours, reference):
        np.testing.assert_array_equal(a.numpy().view(np.uint8), b.numpy().view(np.uint8))
