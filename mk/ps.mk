# Parameter server (radam_dist/ps): generate the gRPC stubs from protos/ into the checkout.
# The stubs are git-ignored. In a source checkout radam_dist.ps.protogen also regenerates missing
# or stale ones on first import, so an editable install works without this step. A wheel
# (`python -m build`) gets them from setup.py's build_py at build time; an installed package
# never writes them.

PS_PROTO     := protos/radam_dist/ps/v1/ps.proto
PS_GENERATED := radam_dist/ps/_generated
PS_STUBS     := $(PS_GENERATED)/ps_pb2.py $(PS_GENERATED)/ps_pb2_grpc.py $(PS_GENERATED)/__init__.py

$(PS_STUBS) &: $(PS_PROTO) radam_dist/ps/protogen.py | $(STAMP)
	@mkdir -p $(PS_GENERATED)
	$(VPY) radam_dist/ps/protogen.py --force

.PHONY: ps-stubs ps-test ps-demo ps-bench
ps-stubs: $(PS_STUBS)  ## generate the parameter-server gRPC stubs

ps-test: $(STAMP) $(PS_STUBS)  ## run only the parameter-server tests
	$(VPY) -m pytest tests/test_ps_*.py $(PYTEST_ARGS)

ps-demo: $(STAMP) $(PS_STUBS)  ## 2 parameter-server shards + 2 Keras workers
	$(VPY) -m examples.ps.demo --out out/ps

ps-bench: $(STAMP) $(PS_STUBS)  ## parameter-server throughput benchmarks (minutes, GiBs)
	$(VPY) bench/ps_throughput.py
	$(VPY) bench/ps_vs_tf_ps_strategy.py

TEST_PREREQS += $(PS_STUBS)
DEMO_PREREQS += $(PS_STUBS)
