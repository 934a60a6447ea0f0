# The one-pass CPU kernel (radam_dist/native): compiled once into the user's cache
# (~/.cache/radam_dist/native), so that the tests and the demo do not each pay the ~10 s build in
# their first step. Without a C++ compiler the build is skipped with a note, and everything runs
# on the XLA path (the same results); the first step that could use the kernel warns once.

NATIVE_STAMP := $(VENV)/.radam_dist-kernel

$(NATIVE_STAMP): radam_dist/native/radam_kernel.cc radam_dist/native/__init__.py | $(STAMP)
	@if $(VPY) -m radam_dist.native >/dev/null; then touch $@; \
	else echo "radam_dist: the one-pass CPU kernel was not built (above); the XLA path runs"; fi

.PHONY: native-kernel
native-kernel: $(NATIVE_STAMP)  ## compile the one-pass CPU kernel into the cache

TEST_PREREQS += $(NATIVE_STAMP)
DEMO_PREREQS += $(NATIVE_STAMP)
