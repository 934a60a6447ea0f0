# Horovod 0.28.1 with TensorFlow + Gloo, built from source into .venv (no wheel exists for
# TF 2.21 / Python 3.11). The stamp makes it a no-op once done; the script itself also skips
# the build when `import horovod.tensorflow` works and `horovodrun --check-build` lists
# TensorFlow and Gloo (e.g. after .venv was refreshed). MPI: see docs/HOROVOD.md.

HOROVOD_STAMP := $(VENV)/.horovod-0.28.1-tf-gloo

.PHONY: horovod
horovod: $(HOROVOD_STAMP)  ## build Horovod 0.28.1 (TensorFlow + Gloo) into .venv

$(HOROVOD_STAMP): $(STAMP) deploy/horovod/build_horovod.sh
	deploy/horovod/build_horovod.sh $(VPY)
	@touch $@

TEST_PREREQS += $(HOROVOD_STAMP)
DEMO_PREREQS += $(HOROVOD_STAMP)
