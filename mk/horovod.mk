# Horovod 0.28.1 with TensorFlow + Gloo, and MPI where Open MPI can be had, built from source
# into .venv (no wheel exists for TF 2.21 / Python 3.11).
#   HOROVOD_MPI=auto (default): install Open MPI first where we may (root + apt-get:
#       deploy/horovod/install_openmpi.sh), then build with MPI if mpicxx is on PATH, else
#       with Gloo only (the MPI tests then skip and say why).
#   HOROVOD_MPI=0: Gloo only, nothing installed.   HOROVOD_MPI=1: MPI required.
# The stamp makes it a no-op once done; the script itself also skips the build when the
# installed Horovod already has what is wanted (`horovodrun --check-build`). See docs/HOROVOD.md.

HOROVOD_MPI ?= auto
HOROVOD_STAMP := $(VENV)/.horovod-0.28.1-tf-gloo-mpi$(HOROVOD_MPI)

.PHONY: horovod
horovod: $(HOROVOD_STAMP)  ## build Horovod 0.28.1 (TensorFlow + Gloo, + MPI where possible) into .venv

$(HOROVOD_STAMP): $(STAMP) deploy/horovod/build_horovod.sh deploy/horovod/install_openmpi.sh
	@if [ "$(HOROVOD_MPI)" != "0" ]; then deploy/horovod/install_openmpi.sh; fi
	HOROVOD_WITH_MPI=$(HOROVOD_MPI) deploy/horovod/build_horovod.sh $(VPY)
	@touch $@

TEST_PREREQS += $(HOROVOD_STAMP)
DEMO_PREREQS += $(HOROVOD_STAMP)
