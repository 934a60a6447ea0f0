"""The fused (XLA, grouped) step gives the same bits as the plain per-variable step.

``radam_dist/fused.py`` compiles ``radam_math.apply_dense`` for many variables at once, or
hands float32 / float64 variables on CPU to the one-pass kernel (``radam_dist/native``); both
backends are checked (``RADAM_DIST_NATIVE=0`` keeps to the XLA chunks). The
plain path (``RADAM_DIST_FUSED=0``: one TF op at a time, variable by variable, as tfa ran)
is the reference: every variable and every slot must match it bit for bit, step after step,
eagerly and in ``tf.function``; inside a caller's ``tf.function(jit_compile=True)``, where XLA
contracts the whole step as it likes, to round-off.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from radam_dist import Lookahead, RectifiedAdam, fused, native, radam_math
from radam_dist import executor

pytestmark = pytest.mark.timeout(300)

SHAPES = [(5, 4), (7,), (2, 3, 5), (), (64, 33)]
STEPS = 8  # RAdam rectifies from step 6 (beta_2=0.999): both branches are covered


def _initial(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def _gradients(seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape).astype(np.float32) for shape in SHAPES] for _ in range(STEPS)]


def _run(make_optimizer, mode, dtype=tf.float32, sparse_index=None, lookahead=False):
    """STEPS steps from fixed values and gradients; returns variables and all slot values."""
    variables = [tf.Variable(tf.cast(x, dtype), name=f"w{i}") for i, x in enumerate(_initial(dtype))]
    optimizer = make_optimizer()
    if lookahead:
        optimizer = Lookahead(optimizer, sync_period=3)

    def step(grads):
        grads = [tf.cast(g, dtype) for g in grads]
        if sparse_index is not None:
            dense = grads[sparse_index]
            rows = tf.constant([0, 2, 0], tf.int32)  # a duplicate row: summed first
            grads[sparse_index] = tf.IndexedSlices(tf.gather(dense, rows), rows,
                                                   tf.shape(dense, out_type=tf.int64))
        optimizer.apply_gradients(zip(grads, variables))

    if mode == "function":
        step = tf.function(step)
    elif mode == "jit_compile":
        step = tf.function(step, jit_compile=True)
    for grads in _gradients():
        step([tf.constant(g) for g in grads])
    slots = [np.asarray(tf.cast(s, tf.float64)) for s in optimizer.weights[1:]]  # slow too
    return [np.asarray(tf.cast(v, tf.float64)) for v in variables] + slots


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the variables that went through the fused path (the executor's dense updates,
    by the kernel or in chunks; a spy, the real path runs)."""
    counted = []
    real = executor.update_dense

    def spy(updates, **kwargs):
        counted.append(len(updates))
        return real(updates, **kwargs)

    monkeypatch.setattr(executor, "update_dense", spy)
    return counted


CASES = {
    "dense": dict(make=lambda: RectifiedAdam(learning_rate=0.01)),
    "amsgrad": dict(make=lambda: RectifiedAdam(learning_rate=0.01, amsgrad=True)),
    "weight_decay": dict(make=lambda: _decay_all_but_bias()),
    "warmup": dict(make=lambda: RectifiedAdam(learning_rate=0.01, total_steps=10,
                                              warmup_proportion=0.3, min_lr=1e-4)),
    "low_threshold": dict(make=lambda: RectifiedAdam(learning_rate=0.01, sma_threshold=2.0,
                                                     beta_2=0.5)),
    "float64": dict(make=lambda: RectifiedAdam(learning_rate=0.01, weight_decay=0.1),
                    dtype=tf.float64),
    "bfloat16": dict(make=lambda: RectifiedAdam(learning_rate=0.01, amsgrad=True),
                     dtype=tf.bfloat16),
    "float16": dict(make=lambda: RectifiedAdam(learning_rate=0.01), dtype=tf.float16),
    "sparse_mixed": dict(make=lambda: RectifiedAdam(learning_rate=0.01, weight_decay=0.1),
                         sparse_index=0),
    "lookahead": dict(make=lambda: RectifiedAdam(learning_rate=0.01), lookahead=True),
}


def _decay_all_but_bias():
    optimizer = RectifiedAdam(learning_rate=0.01, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["w1"])
    return optimizer


@pytest.fixture
def native_calls(monkeypatch):
    """The updates the one-pass kernel applied (a spy; the real kernel runs)."""
    counted = []
    real = native.apply_dense

    def spy(update):
        counted.append(update)
        return real(update)

    monkeypatch.setattr(native, "apply_dense", spy)
    return counted


# A caller's jit_compile keeps to XLA (it cannot compile a custom op).
MODES = [("eager", "native"), ("eager", "xla"), ("function", "native"), ("function", "xla"),
         ("jit_compile", "native")]
KERNEL_DTYPES = (tf.float32, tf.float64)


@pytest.mark.parametrize("mode, backend", MODES, ids=["-".join(m) for m in MODES])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_step_matches_plain_step_bit_for_bit(case, mode, backend, monkeypatch,
                                                   fused_calls, native_calls):
    spec = dict(CASES[case])
    make = spec.pop("make")
    if case == "sparse_mixed" and mode == "jit_compile":
        pytest.skip("XLA cannot compile a sparse update (tf.unique has a dynamic shape)")

    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    plain = _run(make, mode, **spec)
    assert fused_calls == [], "RADAM_DIST_FUSED=0 must keep every variable on the plain path"

    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    monkeypatch.setenv(native.ENV_SWITCH, "1" if backend == "native" else "0")
    monkeypatch.setattr(fused, "ORDER_MIN_ELEMENTS", 1)  # order every update (``_after``)
    fast = _run(make, mode, **spec)
    dense_count = len(SHAPES) - (1 if "sparse_index" in spec else 0)
    assert fused_calls and set(fused_calls) == {dense_count}, fused_calls
    kernel_serves = (backend == "native" and mode != "jit_compile"
                     and spec.get("dtype", tf.float32) in KERNEL_DTYPES)
    assert bool(native_calls) == kernel_serves, (backend, mode, len(native_calls))

    assert len(plain) == len(fast)
    for i, (a, b) in enumerate(zip(plain, fast)):
        _assert_same(a, b, mode, spec.get("dtype", tf.float32), f"{case}/{mode}: array {i}")


def _assert_same(plain, fast, mode, dtype=tf.float32, err_msg=""):
    """Bit for bit, except inside a caller's jit_compile: there XLA contracts the caller's
    computation into FMAs wherever it likes, and the fused path's ordering of the updates
    (``fused._after``) changes which products it contracts, so the two agree to round-off
    (the promise README makes for a model's own jit_compile): relative to each element and
    to the array's scale, since an element that cancels towards zero keeps the absolute
    error of its operands. A 16-bit variable can move by one step of its own type."""
    if mode != "jit_compile":
        np.testing.assert_array_equal(plain, fast, err_msg=err_msg)
        return
    tolerance = max(1e-6, float(ml_dtypes.finfo(dtype.as_numpy_dtype).eps))
    scale = max(1.0, float(np.max(np.abs(plain), initial=0.0)))
    np.testing.assert_allclose(plain, fast, rtol=tolerance, atol=tolerance * scale,
                               err_msg=err_msg)


@pytest.mark.parametrize("mode", ["eager", "function", "jit_compile"])
def test_lookahead_syncs_in_one_branch_through_the_fused_pull_back(mode, monkeypatch):
    """Without a strategy the synchronisation is one branch for all variables; outside a
    caller's XLA its pull-backs run in compiled chunks (spied), and the slow weights end
    where the per-variable path puts them."""
    pulled, chunked = [], []
    real, real_chunks = executor.pull_back, fused.pull_back

    def spy(pairs, *args, **kwargs):
        pulled.append(len(pairs))
        return real(pairs, *args, **kwargs)

    def chunk_spy(pairs, *args, **kwargs):
        chunked.append(len(pairs))
        return real_chunks(pairs, *args, **kwargs)

    monkeypatch.setattr(executor, "pull_back", spy)
    monkeypatch.setattr(fused, "pull_back", chunk_spy)
    make = CASES["lookahead"]["make"]
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    plain = _run(make, mode, lookahead=True)
    assert pulled == []
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    fast = _run(make, mode, lookahead=True)
    if mode == "eager":  # 8 steps, sync_period 3: synchronised after steps 3 and 6
        assert pulled == [len(SHAPES)] * 2
    elif mode == "function":  # traced (the first call also builds the slots, and retraces)
        assert pulled and set(pulled) == {len(SHAPES)}
    else:  # the caller's XLA compiles the pull-backs into its own computation: no chunks
        assert pulled and set(pulled) == {len(SHAPES)} and chunked == []
    slow_weights = fast[len(SHAPES):2 * len(SHAPES)]
    assert not any(np.array_equal(s, x) for s, x in zip(slow_weights, _initial(tf.float32)))
    for a, b in zip(plain, fast):
        _assert_same(a, b, mode)


def test_xla_does_not_contract_the_lookahead_pull_back():
    """slow + alpha * (fast - slow), compiled with a runtime ``one`` and alpha (as the fused
    path calls it), equals TF's kernels bit for bit on a large tensor (an FMA would round
    once where they round twice; about 30% of these elements would differ)."""
    rng = np.random.default_rng(4)
    fast_init, slow_init = (rng.standard_normal(8192).astype(np.float32) for _ in range(2))

    def run(compiled):
        fast, slow = tf.Variable(fast_init), tf.Variable(slow_init)

        def pull(alpha, one):
            radam_math.lookahead_pull_back(fast, slow, alpha, one)

        if compiled:
            pull = tf.function(pull, jit_compile=True)
        pull(tf.constant(0.37), tf.constant(1.0))
        return fast.numpy(), slow.numpy()

    for a, b in zip(run(compiled=False), run(compiled=True)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["function", "jit_compile"])
@pytest.mark.parametrize("case", ["weight_decay", "lookahead"])
def test_compiled_steps_match_the_eager_plain_step(case, mode, monkeypatch):
    """The per-variable eager path (tfa's op-by-op arithmetic) is what the fast path
    reproduces: exactly in a tf.function; under a user's jit_compile XLA also computes the
    per-step scalars (and reassociates their constants) and contracts multiply-adds, so
    there it agrees to round-off."""
    spec = dict(CASES[case])
    make = spec.pop("make")
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    reference = _run(make, "eager", **spec)
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    for a, b in zip(reference, _run(make, mode, **spec)):
        if mode == "function":
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_xla_does_not_contract_products_into_fmas(weight_decay):
    """apply_dense compiled by XLA equals the op-by-op result exactly, given the same step
    scalars: large tensors, both branches (momentum, then rectified), so one contracted
    multiply-add anywhere would show."""
    rng = np.random.default_rng(3)
    shape = (4096,)
    init = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    grad = tf.constant(rng.standard_normal(shape).astype(np.float32))
    hp = radam_math.RAdamHyperparams(beta_2=0.5, sma_threshold=2.0)

    def run(compiled):
        var, m, v = (tf.Variable(x) for x in init)
        v.assign(tf.abs(v))

        def update(s):
            radam_math.apply_dense(var, grad, m, v, None, s)

        if compiled:
            update = tf.function(update, jit_compile=True)
        for step in range(1, 7):
            update(radam_math.step_scalars(step, 0.01, weight_decay, hp,
                                           has_weight_decay=weight_decay > 0))
        return [var.numpy(), m.numpy(), v.numpy()]

    for a, b in zip(run(compiled=False), run(compiled=True)):
        np.testing.assert_array_equal(a, b)


def test_the_update_order_survives_xla_and_changes_no_bit():
    """``fused._after`` orders the chunk's updates through a data dependency: it must be
    the identity on every float (signed zeros, infinities, NaN, subnormals, in every dtype
    the fast path takes), and XLA must keep the dependency: the compiled result must still be
    computed from ``previous``. If an XLA folds the shifts away, the order (and the speed it
    buys, bench/fused_order.py) is gone. This checks what XLA keeps, the data flow from the
    ``previous`` parameter to the result, not how many ops it spends on it (TF 2.19's XLA keeps
    6 shifts, 2.21's 2: issue 24)."""
    special = [-0.0, 0.0, np.inf, -np.inf, np.nan, 1e-45, -3.5, 65504.0]
    for dtype in (tf.float16, tf.bfloat16, tf.float32, tf.float64):
        tensor = tf.cast(tf.constant(special, tf.float64), dtype)
        for first in (-0.0, np.nan, -np.inf, 7.0):
            after = _compiled_after(tf.Variable(tf.cast(tf.fill([3, 2], first), dtype)))
            out = after(tensor)
            bits = {tf.float16: tf.uint16, tf.bfloat16: tf.uint16,
                    tf.float32: tf.uint32, tf.float64: tf.uint64}[dtype]
            np.testing.assert_array_equal(tf.bitcast(out, bits), tf.bitcast(tensor, bits),
                                          err_msg=f"{dtype.name}, previous {first}")
    hlo = after.experimental_get_compiler_ir(tensor)(stage="optimized_hlo")
    assert _entry_result_reads(hlo, "[3,2]"), hlo


def _entry_result_reads(hlo: str, shape: str) -> bool:
    """True when the ENTRY computation's ROOT depends on a parameter of ``shape`` (e.g. "[3,2]")
    through its operands: whatever XLA fused or how many ops it kept, the data flow is there."""
    entry = hlo.split("\nENTRY ", 1)[1].split("\n}", 1)[0].splitlines()[1:]
    ident = r"%?([\w.\-]+)"
    operands, root, wanted = {}, None, set()
    for line in entry:
        match = re.match(r"\s*(ROOT\s+)?" + ident + r"\s*=\s*(.*)$", line)
        if not match:
            continue
        name, rest = match.group(2), match.group(3)
        if match.group(1):
            root = name
        call = re.search(r"\b[\w\-]+\((.*?)\)(?:,|$)", rest)
        operands[name] = set(re.findall(ident, call.group(1))) if call else set()
        if re.search(r"\bparameter\(\d+\)", rest) and shape in rest.split(" parameter(")[0]:
            wanted.add(name)
    assert root is not None and wanted, hlo
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node in wanted:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(operands.get(node, ()))
    return False


def test_large_variables_wait_for_the_previous_update_in_their_chunk(monkeypatch):
    """The chunk orders an update after the previous variable's (``fused._after``, spied at
    trace time) when the variable has at least ORDER_MIN_ELEMENTS elements, and leaves
    small variables free (ordering them costs XLA its overlap and saves no traffic)."""
    ordered = []
    real = fused._after

    def spy(tensor, previous):
        ordered.append((tuple(tensor.shape), tuple(previous.shape)))
        return real(tensor, previous)

    monkeypatch.setattr(fused, "_after", spy)
    monkeypatch.setenv(native.ENV_SWITCH, "0")  # the order is the XLA chunks' concern
    large = (fused.ORDER_MIN_ELEMENTS // 4, 4)
    shapes = [(7,), large, (64,), large, large]  # chunks sort by shape: 7, 64, then large
    variables = [tf.Variable(tf.ones(shape)) for shape in shapes]
    RectifiedAdam(learning_rate=0.01).apply_gradients(
        zip([tf.ones(shape) for shape in shapes], variables))
    # each large variable waits for the one before it, whatever that one's size
    assert ordered == [(large, (64,)), (large, large), (large, large)], ordered


def _compiled_after(previous):
    @tf.function(jit_compile=True)
    def after(tensor):
        return fused._after(tensor, previous)

    return after


def test_fast_path_is_off_under_a_distribution_strategy(fused_calls):
    """Under tf.distribute each variable is updated where it lives (extended.update)."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        var = tf.Variable([1.0, 2.0])
        optimizer = RectifiedAdam(learning_rate=0.1)
    strategy.run(lambda: optimizer.apply_gradients([(tf.constant([0.5, -0.5]), var)]))
    assert fused_calls == []
    assert RectifiedAdam().step_plan().compiles_without_strategy(tf.distribute.get_strategy())
    assert not optimizer.step_plan().compiles_without_strategy(strategy)
