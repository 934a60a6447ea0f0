# Optimizer-step benchmark (bench/optimizer_step.py, docs/BENCHMARKS.md): not part of `make test`.
# Takes minutes and a few GiB (the 100M-parameter set). On first use it creates .venv-tfa
# (TF 2.15 + tensorflow-addons 0.23) and .venv-bench-torch (torch 2.13 CPU) beside .venv;
# point at existing interpreters with BENCH_ARGS="--tfa-python PATH --torch-python PATH".
# Other benchmarks may hang themselves under `bench` too: this rule has no recipe.

BENCH_ARGS ?=

.PHONY: bench bench-optimizer bench-distribute
bench: bench-optimizer bench-distribute  ## run the benchmarks (minutes; see docs/BENCHMARKS.md)

bench-optimizer: $(STAMP)  ## optimizer step vs Keras Adam, tfa, torch, bandwidth bound
	$(VPY) bench/optimizer_step.py --out out/bench $(BENCH_ARGS)

# Issue 13: the step under MirroredStrategy / MWMS and model.fit against Keras Adam, ZeRO-1
# sharded against unsharded (bytes sent per replica), the parameter server against a raw echo.
bench-distribute: $(STAMP) $(PS_STUBS)  ## strategy step, ZeRO-1 and PS push_pull, short forms
	$(VPY) bench/strategy_step.py --quick
	$(VPY) bench/distribute_zero.py --quick --mwms
	$(VPY) bench/ps_throughput.py --quick
