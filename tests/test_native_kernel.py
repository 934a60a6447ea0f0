"""The one-pass CPU kernel (``radam_dist/native``): bit for bit the per-variable step, on the
inputs users give it, and a cache that survives damage and concurrent builders.

The per-variable reference is ``radam_math.apply_dense`` run one TF op at a time; the kernel
is compared with it as bit patterns after several steps, on tensors large enough to be split
across threads (the kernel shards in blocks of 32,768 elements), in every variant the kernel
compiles separately (amsgrad, weight decay, momentum and rectified steps, 1, 2 and 3 gradient
parts, float32 and float64). Through the optimizers, ``test_fused_equivalence.py`` and
``test_fused_strategies.py`` compare it with the same reference under no strategy,
MirroredStrategy and MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from radam_dist import RectifiedAdam, fused, native, radam_math

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
NUMEL = 3 * (1 << 15) + 1234  # four shards, the last one partial


def _need_kernel():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler here: the kernel cannot be built (the XLA path runs)")
    assert native.library() is not None, native.unavailable_reason()
    return native.library()


def _bits(array):
    array = np.asarray(array)
    return array.view(np.uint32 if array.dtype == np.float32 else np.uint64)


def _state(dtype, seed, amsgrad):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(NUMEL) for _ in range(2)] + [
        np.abs(rng.standard_normal(NUMEL))] + ([np.abs(rng.standard_normal(NUMEL))] if amsgrad
                                               else [])
    return [tf.Variable(a.astype(dtype.as_numpy_dtype)) for a in arrays]


def _steps(state, parts_per_step, hp, weight_decay, kernel):
    """Steps 1..n on var, m, v (, vhat): by the kernel, or one TF op at a time."""
    var, m, v = state[:3]
    vhat = state[3] if len(state) > 3 else None
    for step, parts in enumerate(parts_per_step, start=1):
        s = radam_math.step_scalars(step, 0.01, weight_decay, hp, var.dtype,
                                    has_weight_decay=weight_decay > 0)
        update = fused.DenseUpdate(var, tuple(parts) if len(parts) > 1 else parts[0], m, v,
                                   vhat, s)
        if kernel:
            assert native.serves(update, None)
            native.apply_dense(update)
        else:
            radam_math.apply_dense(var, radam_math.sum_in_replica_order(parts), m, v, vhat, s)
    return [x.numpy() for x in state]


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-decay", "decay"])
@pytest.mark.parametrize("num_parts", [1, 2, 3])
def test_kernel_is_bit_for_bit_the_per_variable_step(dtype, amsgrad, weight_decay, num_parts):
    _need_kernel()
    # beta_2 = 0.5 with threshold 2: momentum at step 1, rectified from step 2 on, so both
    # branches run; six steps.
    hp = radam_math.RAdamHyperparams(beta_2=0.5, sma_threshold=2.0, amsgrad=amsgrad)
    rng = np.random.default_rng(7)
    grads = [[tf.constant(rng.standard_normal(NUMEL).astype(dtype.as_numpy_dtype))
              for _ in range(num_parts)] for _ in range(6)]
    reference = _steps(_state(dtype, 1, amsgrad), grads, hp, weight_decay, kernel=False)
    result = _steps(_state(dtype, 1, amsgrad), grads, hp, weight_decay, kernel=True)
    for name, a, b in zip(["var", "m", "v", "vhat"], reference, result):
        np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=name)
    assert not np.array_equal(result[0], _state(dtype, 1, amsgrad)[0].numpy())  # it moved


def test_kernel_in_a_tf_function_and_with_special_values():
    """Inside tf.function (as every training step runs it), with zeros, a NaN gradient and
    an infinite one: the same bits (NaN propagates as TF's kernels propagate it)."""
    _need_kernel()
    hp = radam_math.RAdamHyperparams()
    rng = np.random.default_rng(3)
    grad = rng.standard_normal(NUMEL).astype(np.float32)
    grad[:4] = [0.0, -0.0, np.nan, np.inf]

    def run(kernel):
        state = _state(tf.float32, 2, amsgrad=True)
        state[1].assign(tf.zeros(NUMEL))

        @tf.function
        def step(step_number):
            s = radam_math.step_scalars(step_number, 0.01, 0.0, hp, has_weight_decay=False)
            update = fused.DenseUpdate(state[0], tf.constant(grad), *state[1:], s)
            if kernel:
                native.apply_dense(update)
            else:
                radam_math.apply_dense(update.var, update.grad, update.m, update.v,
                                       update.vhat, s)

        for n in range(1, 8):
            step(tf.constant(n))
        return [x.numpy() for x in state]

    for a, b in zip(run(False), run(True)):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_lookahead_pull_back_is_bit_for_bit_the_per_variable_one(dtype):
    library = _need_kernel()
    rng = np.random.default_rng(11)
    fast, slow = (rng.standard_normal(NUMEL).astype(dtype.as_numpy_dtype) for _ in range(2))

    def run(kernel):
        var, slow_var = tf.Variable(fast), tf.Variable(slow)
        assert native.serves_pull_back(var, slow_var, None)
        for alpha in (0.5, 0.37, 0.8):  # three synchronisations, moving the weights between
            if kernel:
                native.pull_back(var, slow_var, alpha)
            else:
                radam_math.lookahead_pull_back(var, slow_var, alpha)
            var.assign_add(tf.ones_like(var))
        return var.numpy(), slow_var.numpy()

    for a, b in zip(run(False), run(True)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    var, other = tf.Variable(fast), tf.Variable(slow[:-1])
    for call, message in [
            (lambda: library.radam_dist_lookahead_pull_back(var.handle, var.handle,
                                                            tf.constant(0.5, dtype)),
             "var, slow must be different variables"),
            (lambda: library.radam_dist_lookahead_pull_back(var.handle, other.handle,
                                                            tf.constant(0.5, dtype)),
             f"slow has shape \\[{NUMEL - 1}\\], var \\[{NUMEL}\\]")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            call()
        np.testing.assert_array_equal(var.numpy(), fast)


def test_a_tensor_read_before_the_step_keeps_its_values():
    """Copy-on-write: the kernel writes in place only where no earlier read still holds the
    variable's buffer (as TF's own training ops)."""
    _need_kernel()
    var, m, v = _state(tf.float32, 4, amsgrad=False)
    before = tf.identity(var.read_value())  # may share the buffer
    held = var.read_value()
    copy = held.numpy().copy()
    s = radam_math.step_scalars(1, 0.01, 0.0, radam_math.RAdamHyperparams())
    native.apply_dense(fused.DenseUpdate(var, tf.ones(NUMEL), m, v, None, s))
    np.testing.assert_array_equal(held.numpy(), copy)
    np.testing.assert_array_equal(before.numpy(), copy)
    assert not np.array_equal(var.numpy(), copy)


def test_bad_inputs_raise_a_precise_error_and_change_nothing():
    library = _need_kernel()
    var, m, v = _state(tf.float32, 5, amsgrad=False)
    s = radam_math.step_scalars(1, 0.01, 0.0, radam_math.RAdamHyperparams())
    scalars = [s.lr, s.weight_decay, s.beta_1, s.one_minus_beta_1, s.beta_2, s.one_minus_beta_2,
               s.m_correction, s.v_correction, s.r_t, s.rectified, s.epsilon]
    before = [x.numpy().copy() for x in (var, m, v)]
    small = tf.Variable(tf.zeros(7))
    cases = [
        (lambda: library.radam_dist_apply_dense(var.handle, m.handle, v.handle, [],
                                                [tf.ones(NUMEL - 1)], *scalars),
         "var has shape [%d], the gradient [%d]" % (NUMEL, NUMEL - 1)),
        (lambda: library.radam_dist_apply_dense(var.handle, m.handle, v.handle, [],
                                                [tf.ones(NUMEL), tf.ones(3)], *scalars),
         "gradient part 1 has shape [3]"),
        (lambda: library.radam_dist_apply_dense(var.handle, small.handle, v.handle, [],
                                                [tf.ones(NUMEL)], *scalars),
         "m has shape [7]"),
        (lambda: library.radam_dist_apply_dense(var.handle, var.handle, v.handle, [],
                                                [tf.ones(NUMEL)], *scalars),
         "must be different variables"),
        (lambda: library.radam_dist_apply_dense(
            var.handle, m.handle, v.handle, [], [tf.ones(NUMEL, tf.float64)],
            *[tf.cast(x, tf.float64) if x.dtype == tf.float32 else x for x in scalars]),
         "var has dtype float, the gradient double"),
    ]
    for call, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("[", r"\[")
                           .replace("]", r"\]")):
            call()
        for x, b in zip((var, m, v), before):
            np.testing.assert_array_equal(x.numpy(), b)


def test_the_kernel_serves_only_what_it_can():
    """float32 / float64 throughout, CPU devices, outside XLA; everything else keeps the XLA
    chunks (16-bit variables, mixed dtypes, GPU placements, a caller's jit_compile)."""
    _need_kernel()
    import radam_dist

    assert radam_dist.native is native  # reachable from a plain import, as README shows
    s32 = radam_math.step_scalars(1, 0.01, 0.0, radam_math.RAdamHyperparams())

    def update(dtype, grad_dtype=None):
        var, m, v = (tf.Variable(tf.zeros(3, dtype)) for _ in range(3))
        return fused.DenseUpdate(var, tf.zeros(3, grad_dtype or dtype), m, v, None, s32)

    assert native.serves(update(tf.float32), None)
    assert native.serves(update(tf.float32), "/job:localhost/replica:0/task:0/device:CPU:1")
    assert not native.serves(update(tf.float32), "/device:GPU:0")
    assert not native.serves(update(tf.bfloat16), None)  # computes in float32: XLA casts
    assert not native.serves(update(tf.float64), None)  # float32 scalars for float64
    assert not native.serves(update(tf.float32, tf.float16), None)

    plain = update(tf.float32)

    @tf.function(jit_compile=True)
    def inside_xla():
        return tf.constant(native.serves(plain, None))

    assert not bool(inside_xla())


def test_switched_off_the_fused_step_keeps_to_xla_chunks(monkeypatch):
    calls = []
    real = native.apply_dense
    monkeypatch.setattr(native, "apply_dense", lambda u: (calls.append(u), real(u)))
    variables = [tf.Variable(tf.ones((40, 30))), tf.Variable(tf.ones(30))]
    grads = [tf.fill((40, 30), 0.5), tf.fill([30], -0.5)]
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    RectifiedAdam(0.01).apply_gradients(zip(grads, variables))
    assert calls == []
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    _need_kernel()
    RectifiedAdam(0.01).apply_gradients(zip(grads, variables))
    assert len(calls) == 2


# -- the cache ----------------------------------------------------------------------------------
BUILD_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from radam_dist import native
    path = native.build()
    native._load(path)
    print("BUILT " + json.dumps(str(path)))
""")


def _build_in_subprocess(env):
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_concurrent_builders_compile_once_and_a_damaged_library_is_rebuilt(tmp_path, caplog):
    """Two processes build into one empty cache at the same time: one compiles, the other
    waits for it and loads the same library. Then the library is damaged on disk (a byte
    flipped, then cut short, then its SHA-256 record removed): each is noticed before TF
    loads anything, and the next build compiles it afresh."""
    _need_kernel()
    cache = tmp_path / "cache"
    env = dict(os.environ, RADAM_DIST_NATIVE_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="3")
    builders = [_build_in_subprocess(env) for _ in range(2)]
    outputs = [b.communicate(timeout=240)[0] for b in builders]
    assert [b.returncode for b in builders] == [0, 0], outputs
    paths = {json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines()
             if line.startswith("BUILT ")}
    assert len(paths) == 1, outputs
    compiled = sum(out.count("compiling the one-pass CPU kernel") for out in outputs)
    assert compiled == 1, outputs
    library = Path(paths.pop())
    record = library.with_suffix(".sha256")
    good = library.read_bytes()
    assert record.read_text().strip() == native._digest(library)

    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x40
    library.write_bytes(bytes(flipped))
    with caplog.at_level("WARNING", logger="radam_dist.native"):
        assert not native._verified(library)
    assert "does not match its recorded SHA-256" in caplog.text
    library.write_bytes(good)
    assert native._verified(library)
    record.unlink()  # a build that died between the library and its record
    assert not native._verified(library)

    library.write_bytes(good[: len(good) // 3])  # cut short, with the record gone too
    with caplog.at_level("INFO", logger="radam_dist.native"):
        assert native.build(cache) == library
    assert "compiling the one-pass CPU kernel" in caplog.text
    assert native._verified(library)
    assert not list(library.parent.glob("*.partial"))


def test_without_a_compiler_training_warns_once_and_runs_on_xla(tmp_path):
    """No compiler (CXX names none): one warning that says why and what to do, no cache
    written, and the step's bits are those of the XLA chunks."""
    script = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        from radam_dist import RectifiedAdam, native
        var = tf.Variable(np.linspace(-1, 1, 50, dtype=np.float32))
        opt = RectifiedAdam(0.01)
        for _ in range(3):
            opt.apply_gradients([(tf.fill([50], 0.25), var)])
        assert native.library() is None
        print("RESULT", var.numpy().view(np.uint32).tolist())
    """)
    cache = tmp_path / "cache"

    def run(**extra):
        env = dict(os.environ, RADAM_DIST_NATIVE_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="3",
                   **extra)
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=240)
        return done

    missing = run(CXX="no-such-compiler-radam-dist")
    assert missing.returncode == 0, missing.stderr[-3000:]
    assert missing.stderr.count("the one-pass CPU kernel is not available") == 1, missing.stderr
    assert "no C++ compiler 'no-such-compiler-radam-dist' on PATH" in missing.stderr
    assert "RADAM_DIST_NATIVE=0" in missing.stderr
    assert not cache.exists() or not list(cache.rglob("*.so"))
    xla = run(RADAM_DIST_NATIVE="0", CXX="no-such-compiler-radam-dist")
    assert xla.returncode == 0, xla.stderr[-3000:]
    assert "not available" not in xla.stderr  # switched off: nothing to warn about

    def result(done):
        return [line for line in done.stdout.splitlines() if line.startswith("RESULT")]

    assert result(missing) == result(xla) and result(xla)


def test_an_unwritable_cache_is_a_clear_build_error(tmp_path):
    _need_kernel()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(native.BuildError, match="cannot write the kernel cache .* set "
                                                "RADAM_DIST_NATIVE_CACHE"):
        native.build(blocked / "cache")


SAVED_MODEL_LOAD = textwrap.dedent("""
    import sys
    import tensorflow as tf
    if sys.argv[2] == "with-kernel":
        from radam_dist import native
        assert native.library() is not None
    model = tf.saved_model.load(sys.argv[1])
    print("STEP", model.train(tf.ones([100])).numpy()[:2].tolist())
""")


def test_a_saved_model_that_runs_the_optimizer_loads_once_the_kernel_is_loaded(tmp_path):
    """The README's caveat, as a user meets it: a SavedModel whose function applies the
    optimizer holds the kernel's op; loaded without it, TF names the op; with
    ``native.library()`` first, it loads and trains on."""
    _need_kernel()

    class Trainer(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones([100]))
            self.optimizer = RectifiedAdam(0.01)
            self.optimizer.build([self.w])

        @tf.function(input_signature=[tf.TensorSpec([100], tf.float32)])
        def train(self, grad):
            self.optimizer.apply_gradients([(grad, self.w)])
            return self.w.read_value()

    trainer = Trainer()
    trainer.train(tf.ones([100]))
    tf.saved_model.save(trainer, str(tmp_path / "model"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

    def load(mode):
        return subprocess.run([sys.executable, "-c", SAVED_MODEL_LOAD, str(tmp_path / "model"),
                               mode], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=240)

    without = load("without-kernel")
    assert without.returncode != 0
    assert "Op type not registered 'RadamDistApplyDense'" in without.stderr, without.stderr[-2000:]
    loaded = load("with-kernel")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "STEP" in loaded.stdout
