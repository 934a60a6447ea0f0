"""Generate ``tests/data/tfa_reference.json`` with tensorflow-addons 0.23 itself.

The file holds reference trajectories of ``tfa.optimizers.RectifiedAdam`` and
``tfa.optimizers.Lookahead`` (the legacy Keras 2 optimizers of TF 2.15) on
small variables, driven by seeded numpy gradients that are stored in the JSON
so that ``tests/test_tfa_reference.py`` can replay exactly the same gradients
through our Keras 3 port.

This script needs its own environment (it is NOT run by the test-suite);
``make tfa-reference`` creates it from requirements-tfa.txt and runs the script, or by hand::

    python3.11 -m venv .venv-tfa
    .venv-tfa/bin/pip install -r requirements-tfa.txt
    .venv-tfa/bin/python tests/data/make_tfa_reference.py

(``--out`` defaults to ``tests/data/tfa_reference.json``.)

Everything runs eagerly with ``opt.apply_gradients(zip(grads, vars))``.
Float values are stored as Python floats obtained with
``array.astype(np.float64).tolist()``, which round-trips float32 values exactly.

JSON layout::

    {"generator": "tests/data/make_tfa_reference.py",
     "tfa_version": str, "tf_version": str,
     "cases": [CASE, ...]}

    CASE = {
      "name": str,
      "optimizer": "RectifiedAdam" | "Lookahead",
      "kwargs": constructor kwargs; a schedule is
                {"schedule": <keras class name>, "config": {...}},
                a zero-argument callable is {"callable_values": [v_step1, ...]},
                Lookahead: {"sync_period", "slow_step_size", "inner": {...}},
      "dtype": "float32" | "float64",
      "variables": [{"name": str, "initial": nested list}, ...],
      "steps": [[GRAD per variable] per step], GRAD = {"dense": nested list}
               or {"indices": [...], "values": rows, "dense_shape": [...]},
      "trajectory": [[value of each variable after step k] for k = 1..n],
      "final_slots": {slot name: [value per variable]},
      "iterations": int,
      "get_config": tfa get_config() of the freshly built optimizer, JSON-able,
      "weights_layout": ["iter", "m:w0", ...]  (order of get_weights())
    }
"""

import argparse
import json
import os
import warnings
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_addons as tfa  # noqa: E402

BASE_SEED = 20240523
GENERATOR = "tests/data/make_tfa_reference.py"


# --------------------------------------------------------------------------
# Case specifications
# --------------------------------------------------------------------------
def sched(class_name, **config):
    """Schedule spec; normalised to tfa/keras' own get_config() later."""
    return {"schedule": class_name, "config": config}


DENSE2 = [("w0", (3,), "dense"), ("w1", (2, 3), "dense")]


def spec(name, kwargs, n_steps=10, variables=DENSE2, dtype="float32",
         optimizer="RectifiedAdam", large_steps=(4, 8)):
    return {
        "name": name,
        "optimizer": optimizer,
        "kwargs": kwargs,
        "n_steps": n_steps,
        "variables": variables,
        "dtype": dtype,
        "large_steps": tuple(large_steps),
    }


def case_specs():
    sparse_mixed = [("w0", (6, 3), "sparse"), ("w1", (2, 3), "dense")]
    sparse_both = [("w0", (6, 3), "sparse"), ("w1", (5,), "sparse")]
    la_sparse = [("w0", (6, 3), "sparse"), ("w1", (3,), "dense")]
    return [
        spec("default", {}),
        spec("lr_0.01", {"learning_rate": 0.01}),
        spec("lr_0.01_sma_threshold_4", {"learning_rate": 0.01, "sma_threshold": 4.0}),
        spec("lr_0.01_sma_threshold_10", {"learning_rate": 0.01, "sma_threshold": 10.0},
             n_steps=14),
        spec("beta2_0.99", {"learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.99,
                            "epsilon": 1e-6}, n_steps=12),
        spec("amsgrad", {"learning_rate": 0.01, "amsgrad": True}, n_steps=12,
             large_steps=(2, 7)),
        spec("weight_decay", {"learning_rate": 0.01, "weight_decay": 0.01}),
        spec("weight_decay_schedule", {
            "learning_rate": 0.01,
            "weight_decay": sched("ExponentialDecay", initial_learning_rate=0.05,
                                  decay_steps=4, decay_rate=0.5)}),
        spec("lr_exponential_decay", {
            "learning_rate": sched("ExponentialDecay", initial_learning_rate=0.01,
                                   decay_steps=3, decay_rate=0.5)}),
        spec("lr_exponential_decay_staircase", {
            "learning_rate": sched("ExponentialDecay", initial_learning_rate=0.01,
                                   decay_steps=3, decay_rate=0.5, staircase=True)}),
        spec("lr_piecewise_constant", {
            "learning_rate": sched("PiecewiseConstantDecay", boundaries=[3, 6],
                                   values=[0.01, 0.005, 0.002])}),
        spec("lr_inverse_time_decay", {
            "learning_rate": sched("InverseTimeDecay", initial_learning_rate=0.01,
                                   decay_steps=2, decay_rate=0.5)}),
        spec("lr_polynomial_decay", {
            "learning_rate": sched("PolynomialDecay", initial_learning_rate=0.01,
                                   decay_steps=8, end_learning_rate=0.001, power=2.0)},
             n_steps=12),
        spec("lr_callable", {"learning_rate": "CALLABLE"}),
        spec("warmup_total10", {"learning_rate": 0.01, "total_steps": 10,
                                "warmup_proportion": 0.1, "min_lr": 1e-5}, n_steps=12),
        spec("warmup_total25_fractional", {"learning_rate": 0.01, "total_steps": 25,
                                           "warmup_proportion": 0.17, "min_lr": 1e-4},
             n_steps=30, large_steps=(4, 8, 20)),
        spec("warmup_with_schedule", {
            "learning_rate": sched("PiecewiseConstantDecay", boundaries=[5],
                                   values=[0.01, 0.004]),
            "total_steps": 12, "warmup_proportion": 0.25, "min_lr": 1e-4}, n_steps=14),
        spec("legacy_decay", {"learning_rate": 0.01, "decay": 0.05}),
        spec("lr_alias", {"lr": 0.02}),
        spec("clipnorm", {"learning_rate": 0.01, "clipnorm": 0.1}),
        spec("clipvalue", {"learning_rate": 0.01, "clipvalue": 0.05}),
        spec("global_clipnorm", {"learning_rate": 0.01, "global_clipnorm": 0.2}),
        spec("sparse_duplicates", {"learning_rate": 0.01}, variables=sparse_mixed),
        spec("sparse_amsgrad_weight_decay", {"learning_rate": 0.01, "amsgrad": True,
                                             "weight_decay": 0.01},
             n_steps=12, variables=sparse_both, large_steps=(2, 7)),
        spec("lookahead_dense", {"sync_period": 3, "slow_step_size": 0.5,
                                 "inner": {"learning_rate": 0.01}},
             optimizer="Lookahead"),
        spec("lookahead_sparse", {"sync_period": 3, "slow_step_size": 0.5,
                                  "inner": {"learning_rate": 0.01}},
             optimizer="Lookahead", variables=la_sparse),
        spec("lookahead_inner_schedule_amsgrad", {
            "sync_period": 4, "slow_step_size": 0.3,
            "inner": {"learning_rate": sched("ExponentialDecay",
                                             initial_learning_rate=0.01,
                                             decay_steps=3, decay_rate=0.5),
                      "amsgrad": True, "weight_decay": 0.01}},
            optimizer="Lookahead", n_steps=12, large_steps=(2, 7)),
        # tfa's Lookahead drives the inner optimizer through its private
        # _resource_apply_* methods, so the inner optimizer's clipnorm is
        # never applied.
        spec("lookahead_inner_clipnorm_ignored", {
            "sync_period": 3, "slow_step_size": 0.5,
            "inner": {"learning_rate": 0.01, "clipnorm": 0.01}},
            optimizer="Lookahead"),
        spec("float64", {"learning_rate": 0.01}, n_steps=12, dtype="float64"),
        spec("float64_sparse_amsgrad_weight_decay", {
            "learning_rate": 0.01, "amsgrad": True, "weight_decay": 0.01},
            n_steps=12, variables=sparse_mixed, dtype="float64", large_steps=(2, 7)),
        spec("combined_amsgrad_wd_warmup_40", {
            "learning_rate": 0.003, "amsgrad": True, "weight_decay": 0.01,
            "total_steps": 40, "warmup_proportion": 0.1, "min_lr": 1e-4},
            n_steps=40, large_steps=(3, 9, 17, 30)),
    ]


# The scenarios of tensorflow/addons' own rectified_adam_test.py (see
# tests/data/tfa_published_expectations.json), recomputed step by step with
# tfa 0.23. Constant gradients, variables [1, 2] and [3, 4].
def published_specs():
    out = []
    dense_grads = ([0.1, 0.2], [0.03, 0.04])
    sparse_grads = ((0, 0.1), (1, 0.04))
    runs = [
        ("published_dense_sample", "dense", 100, "RectifiedAdam", {"lr": 1e-3}),
        ("published_sparse_sample", "sparse", 200, "RectifiedAdam", {"lr": 1e-3}),
        ("published_dense_sample_with_amsgrad", "dense", 100, "RectifiedAdam",
         {"lr": 1e-3, "amsgrad": True}),
        ("published_dense_sample_with_weight_decay", "dense", 100, "RectifiedAdam",
         {"lr": 1e-3, "weight_decay": 0.01}),
        ("published_sparse_sample_with_weight_decay", "sparse", 200, "RectifiedAdam",
         {"lr": 1e-3, "weight_decay": 0.01}),
        ("published_dense_sample_with_warmup", "dense", 100, "RectifiedAdam",
         {"lr": 1e-3, "total_steps": 100, "warmup_proportion": 0.1, "min_lr": 1e-5}),
        ("published_sparse_sample_with_warmup", "sparse", 200, "RectifiedAdam",
         {"lr": 1e-3, "total_steps": 200, "warmup_proportion": 0.1, "min_lr": 1e-5}),
        ("published_dense_sample_with_lookahead", "dense", 100, "Lookahead",
         {"sync_period": 6, "slow_step_size": 0.45,
          "inner": {"lr": 1e-3, "beta_1": 0.95}}),
        ("published_sparse_sample_with_lookahead", "sparse", 150, "Lookahead",
         {"sync_period": 6, "slow_step_size": 0.45,
          "inner": {"lr": 1e-3, "beta_1": 0.95}}),
        ("published_schedulers", "dense", 100, "RectifiedAdam",
         {"learning_rate": sched("ExponentialDecay", initial_learning_rate=1e-3,
                                 decay_steps=50, decay_rate=0.5),
          "weight_decay": sched("InverseTimeDecay", initial_learning_rate=2e-3,
                                decay_steps=25, decay_rate=0.25)}),
    ]
    for name, kind, n, opt, kwargs in runs:
        if kind == "dense":
            grads = [{"dense": list(g)} for g in dense_grads]
        else:
            grads = [{"indices": [i], "values": [v], "dense_shape": [2]}
                     for i, v in sparse_grads]
        out.append({
            "name": name,
            "optimizer": opt,
            "kwargs": kwargs,
            "dtype": "float32",
            "fixed_variables": [("w0", [1.0, 2.0]), ("w1", [3.0, 4.0])],
            "fixed_steps": [grads] * n,
        })
    return out


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def to_list(x, dtype):
    return np.asarray(x).astype(dtype).astype(np.float64).tolist()


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (tf.Variable, tf.Tensor)):
        obj = obj.numpy()
    if isinstance(obj, np.ndarray):
        return obj.astype(np.float64).tolist() if obj.dtype.kind == "f" else obj.tolist()
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    return obj


def normalise_schedules(kwargs):
    """Replace compact schedule specs by keras' own (class_name, config)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, dict) and "schedule" in value:
            cls = getattr(tf.keras.optimizers.schedules, value["schedule"])
            ser = tf.keras.optimizers.schedules.serialize(cls(**value["config"]))
            value = {"schedule": ser["class_name"], "config": jsonable(ser["config"])}
        elif isinstance(value, dict) and key == "inner":
            value = normalise_schedules(value)
        out[key] = value
    return out


def build_kwargs(kwargs, callables):
    """JSON kwargs -> real tfa kwargs. ``callables`` collects (tf.Variable,
    values) pairs that must be assigned before each step."""
    real = {}
    for key, value in kwargs.items():
        if isinstance(value, dict) and "schedule" in value:
            value = tf.keras.optimizers.schedules.deserialize(
                {"class_name": value["schedule"], "config": value["config"]})
        elif isinstance(value, dict) and "callable_values" in value:
            holder = tf.Variable(value["callable_values"][0], dtype=tf.float32,
                                 trainable=False)
            callables.append((holder, value["callable_values"]))
            value = (lambda h: (lambda: h))(holder)
        real[key] = value
    return real


def build_optimizer(name, kwargs, callables):
    if name == "RectifiedAdam":
        return tfa.optimizers.RectifiedAdam(**build_kwargs(kwargs, callables))
    if name == "Lookahead":
        inner = tfa.optimizers.RectifiedAdam(**build_kwargs(kwargs["inner"], callables))
        return tfa.optimizers.Lookahead(
            inner, sync_period=kwargs["sync_period"],
            slow_step_size=kwargs["slow_step_size"])
    raise ValueError(name)


def slot_names(opt):
    if isinstance(opt, tfa.optimizers.Lookahead):
        return ["slow"] + slot_names(opt._optimizer)
    return ["m", "v"] + (["vhat"] if opt.amsgrad else [])


def get_slot(opt, var, slot):
    if isinstance(opt, tfa.optimizers.Lookahead) and slot != "slow":
        return opt._optimizer.get_slot(var, slot)
    return opt.get_slot(var, slot)


def weights_layout(opt, variables, var_names):
    layout = []
    for w in opt.weights:
        if w is opt.iterations:
            layout.append("iter")
            continue
        found = None
        for slot in slot_names(opt):
            for var, vname in zip(variables, var_names):
                if get_slot(opt, var, slot) is w:
                    found = f"{slot}:{vname}"
        if found is None:
            raise RuntimeError(f"unidentified optimizer weight {w.name}")
        layout.append(found)
    return layout


def make_grad(g, dtype):
    if "dense" in g:
        return tf.constant(np.asarray(g["dense"], dtype=dtype))
    return tf.IndexedSlices(
        values=tf.constant(np.asarray(g["values"], dtype=dtype)),
        indices=tf.constant(g["indices"], tf.int64),
        dense_shape=tf.constant(g["dense_shape"], tf.int64))


# --------------------------------------------------------------------------
# Data generation
# --------------------------------------------------------------------------
def generate_inputs(s):
    """Seeded numpy initial values, gradients and callable values."""
    rng = np.random.default_rng([BASE_SEED, zlib.crc32(s["name"].encode())])
    dtype = np.dtype(s["dtype"])
    variables = [{"name": n, "initial": to_list(rng.standard_normal(shape), dtype)}
                 for n, shape, _ in s["variables"]]
    steps = []
    for k in range(1, s["n_steps"] + 1):
        scale = rng.uniform(0.1, 1.0) * (20.0 if k in s["large_steps"] else 1.0)
        grads = []
        for _, shape, kind in s["variables"]:
            if kind == "dense":
                grads.append({"dense": to_list(rng.standard_normal(shape) * scale, dtype)})
            else:
                n_rows = int(rng.integers(2, 5))
                idx = rng.integers(0, shape[0], size=n_rows).tolist()
                # always at least one duplicated row, in a shuffled position
                idx.append(idx[int(rng.integers(0, n_rows))])
                idx = [idx[i] for i in rng.permutation(len(idx))]
                values = rng.standard_normal((len(idx),) + tuple(shape[1:])) * scale
                grads.append({"indices": [int(i) for i in idx],
                              "values": to_list(values, dtype),
                              "dense_shape": list(shape)})
        steps.append(grads)
    kwargs = dict(s["kwargs"])
    if kwargs.get("learning_rate") == "CALLABLE":
        vals = rng.uniform(0.001, 0.02, size=s["n_steps"])
        # float32-representable values, so the holder variable stores them exactly
        kwargs["learning_rate"] = {"callable_values": to_list(vals, np.float32)}
    return variables, steps, kwargs


def run_case(name, optimizer, kwargs, dtype, variables, steps):
    kwargs = normalise_schedules(kwargs)
    callables = []
    opt = build_optimizer(optimizer, kwargs, callables)
    config = jsonable(opt.get_config())
    np_dtype = np.dtype(dtype)
    tvars = [tf.Variable(np.asarray(v["initial"], dtype=np_dtype), name=v["name"])
             for v in variables]
    trajectory = []
    for k, step in enumerate(steps):
        for holder, values in callables:
            holder.assign(values[k])
        grads = [make_grad(g, np_dtype) for g in step]
        opt.apply_gradients(zip(grads, tvars))
        trajectory.append([to_list(v.numpy(), np_dtype) for v in tvars])
    final_slots = {slot: [to_list(get_slot(opt, v, slot).numpy(), np_dtype) for v in tvars]
                   for slot in slot_names(opt)}
    names = [v["name"] for v in variables]
    for vals in trajectory:
        for arr in vals:
            if not np.all(np.isfinite(arr)):
                raise RuntimeError(f"{name}: non-finite values in the trajectory")
    return {
        "name": name,
        "optimizer": optimizer,
        "kwargs": kwargs,
        "dtype": dtype,
        "variables": variables,
        "steps": steps,
        "trajectory": trajectory,
        "final_slots": final_slots,
        "iterations": int(opt.iterations.numpy()),
        "get_config": config,
        "weights_layout": weights_layout(opt, tvars, names),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/tfa_reference.json")
    parser.add_argument("--no-published", action="store_true",
                        help="skip the long published_* scenarios")
    args = parser.parse_args()

    tf.config.run_functions_eagerly(True)
    cases = []
    for s in case_specs():
        variables, steps, kwargs = generate_inputs(s)
        cases.append(run_case(s["name"], s["optimizer"], kwargs, s["dtype"],
                              variables, steps))
        print(f"{s['name']}: {len(steps)} steps")
    if not args.no_published:
        for s in published_specs():
            variables = [{"name": n, "initial": v} for n, v in s["fixed_variables"]]
            cases.append(run_case(s["name"], s["optimizer"], s["kwargs"], s["dtype"],
                                  variables, s["fixed_steps"]))
            final = cases[-1]["trajectory"][-1]
            print(f"{s['name']}: final {np.round(final, 6).tolist()}")

    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    doc = {
        "generator": GENERATOR,
        "tfa_version": tfa.__version__,
        "tf_version": tf.__version__,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, allow_nan=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}: {len(cases)} cases, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
