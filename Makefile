# darknet_bn - build, test, benchmark, demo.
#
#   make          build/libdarknet_bn.so, build/libdarknet_bn.a, build/bench_batchnorm,
#                 build/tiny_net
#   make test     C tests (plain, under ASan+UBSan, under valgrind), the C API fuzz driver, then a virtual
#                 environment (.venv) with the package and its extras, then pytest
#   make demo     the batch-norm paper's experiment on MNIST, and data-parallel SyncBN vs per-rank BN
#                 (python -m darknet_bn.demo)
#   make bench    the Python benchmark against PyTorch, NumPy and the reference path (1, 2 and all
#                 cores; in a PyTorch process; channels-last; CNN and ResNet-18-like models, also with
#                 OMP_WAIT_POLICY=PASSIVE) into docs/bench/<machine>/, then synchronized batch norm on
#                 2 ranks (MPI and gloo) against local batch norm
#   make bench-c  the C benchmark (every kernel and the layer vs the reference loops)
#   make count-instructions  instructions per value of the layer's calls, counted by callgrind
#   make mpi-example  the C phases over MPI on 3 ranks (examples/mpi_phases.c)
#   make darknet-shim, make test-darknet, make bench-darknet   darknet_bn inside Debian's Darknet (below)
#   make FLAVOR=alexeyab   also build/libdarknet_bn_alexeyab.{a,so}: the kernels with AlexeyAB's arithmetic
#   make install  the C library, its header and darknet_bn.pc under PREFIX (default /usr/local;
#                 DESTDIR is honoured); make uninstall removes them
#   make dist-check  sdist and wheel (python -m build), then pip install of the sdist into a
#                 fresh virtual environment and a smoke test there
#
# The library's compiler flags live in csrc/cflags.txt, shared with the cffi
# build (darknet_bn/_ffi_build.py); the Makefile adds -Werror for its own builds.

CC ?= cc
PYTHON ?= python3
BUILD := build
VENV := .venv
VPY := $(VENV)/bin/python

CFLAGS_LIB := $(shell cat csrc/cflags.txt) -Werror
LDLIBS := -lm -pthread

LIB_SRCS := $(sort $(wildcard csrc/*.c))
LIB_OBJS := $(patsubst csrc/%.c,$(BUILD)/obj/%.o,$(LIB_SRCS))
HEADERS := $(wildcard csrc/*.h)

.PHONY: count-instructions mpi-example fuzz all lib flavors darknet-shim darknet-installed test-darknet bench-darknet test ctest sanitize valgrind tools pytest venv demo bench bench-c clean install uninstall dist-check

FLAVOR ?= pjreddie
ifeq ($(FLAVOR),alexeyab)
FLAVOR_LIBS := $(BUILD)/libdarknet_bn_alexeyab.so $(BUILD)/libdarknet_bn_alexeyab.a
else ifneq ($(FLAVOR),pjreddie)
$(error FLAVOR must be pjreddie or alexeyab, not "$(FLAVOR)")
endif

all: $(BUILD)/libdarknet_bn.so $(BUILD)/libdarknet_bn.a $(BUILD)/bench_batchnorm $(BUILD)/tiny_net $(FLAVOR_LIBS)

lib: $(BUILD)/libdarknet_bn.so $(BUILD)/libdarknet_bn.a

$(BUILD)/obj/%.o: csrc/%.c $(HEADERS) csrc/cflags.txt
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LIB) -c $< -o $@

$(BUILD)/libdarknet_bn.a: $(LIB_OBJS)
	rm -f $@
	ar rcs $@ $^

$(BUILD)/libdarknet_bn.so: $(LIB_OBJS)
	$(CC) -shared -o $@ $^ $(LDLIBS)

# The AlexeyAB flavor of the kernels (csrc/internal.h): the same sources with
# -DDNBN_FLAVOR_ALEXEYAB, as build/libdarknet_bn_alexeyab.{a,so}.
# `make FLAVOR=alexeyab` adds them to the default target; make test always builds them.
ALEXEYAB_OBJS := $(patsubst csrc/%.c,$(BUILD)/obj-alexeyab/%.o,$(LIB_SRCS))
ALEXEYAB_LIBS := $(BUILD)/libdarknet_bn_alexeyab.so $(BUILD)/libdarknet_bn_alexeyab.a

$(BUILD)/obj-alexeyab/%.o: csrc/%.c $(HEADERS) csrc/cflags.txt
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LIB) -DDNBN_FLAVOR_ALEXEYAB -c $< -o $@

$(BUILD)/libdarknet_bn_alexeyab.a: $(ALEXEYAB_OBJS)
	rm -f $@
	ar rcs $@ $^

$(BUILD)/libdarknet_bn_alexeyab.so: $(ALEXEYAB_OBJS)
	$(CC) -shared -o $@ $^ $(LDLIBS)

flavors: $(ALEXEYAB_LIBS)

$(BUILD)/bench_batchnorm: benchmarks/bench_batchnorm.c $(BUILD)/libdarknet_bn.a
	$(CC) $(CFLAGS_LIB) -Icsrc $< $(BUILD)/libdarknet_bn.a -o $@ $(LDLIBS)

$(BUILD)/count_instructions: benchmarks/count_instructions.c $(BUILD)/libdarknet_bn.a
	$(CC) $(CFLAGS_LIB) -Icsrc $< $(BUILD)/libdarknet_bn.a -o $@ $(LDLIBS)

$(BUILD)/test_darknet_bn: $(wildcard tests/c/*.c tests/c/*.h) $(BUILD)/libdarknet_bn.a
	$(CC) $(CFLAGS_LIB) -Icsrc $(wildcard tests/c/*.c) $(BUILD)/libdarknet_bn.a -o $@ $(LDLIBS)

$(BUILD)/c_example: examples/c_example.c $(BUILD)/libdarknet_bn.a
	$(CC) $(CFLAGS_LIB) -Icsrc $< $(BUILD)/libdarknet_bn.a -o $@ $(LDLIBS)

$(BUILD)/tiny_net: examples/tiny_net.c $(BUILD)/libdarknet_bn.a
	$(CC) $(CFLAGS_LIB) -Icsrc $< $(BUILD)/libdarknet_bn.a -o $@ $(LDLIBS)

ctest: $(BUILD)/test_darknet_bn $(BUILD)/c_example $(BUILD)/tiny_net
	$(BUILD)/c_example
	$(BUILD)/tiny_net
	$(BUILD)/test_darknet_bn

# The C tests again under AddressSanitizer + UndefinedBehaviorSanitizer, and
# under valgrind memcheck (installed with apt-get when missing).
SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1
$(BUILD)/test_darknet_bn_asan: $(LIB_SRCS) $(HEADERS) $(wildcard tests/c/*.c tests/c/*.h)
	@mkdir -p $(BUILD)
	$(CC) $(filter-out -O3,$(CFLAGS_LIB)) $(SANFLAGS) -Icsrc $(LIB_SRCS) $(wildcard tests/c/*.c) -o $@ $(LDLIBS)

# A random driver over the whole public C API (tests/fuzz/fuzz_api.c) under ASan + UBSan: caller-built
# layers with zero, negative and inconsistent sizes, NULL buffers, any state; every function in random
# order. make test runs it for FUZZ_SECONDS; `make fuzz FUZZ_SECONDS=600` for a long run.
FUZZ_SECONDS ?= 10
$(BUILD)/fuzz_api: $(LIB_SRCS) $(HEADERS) tests/fuzz/fuzz_api.c
	@mkdir -p $(BUILD)
	$(CC) $(filter-out -O3,$(CFLAGS_LIB)) $(SANFLAGS) -Icsrc $(LIB_SRCS) tests/fuzz/fuzz_api.c -o $@ $(LDLIBS)

fuzz: $(BUILD)/fuzz_api
	$(BUILD)/fuzz_api --seconds $(FUZZ_SECONDS)

sanitize: $(BUILD)/test_darknet_bn_asan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 $(BUILD)/test_darknet_bn_asan

valgrind: $(BUILD)/test_darknet_bn
	command -v valgrind >/dev/null || (apt-get update -qq && apt-get install -y -qq valgrind)
	valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
		--show-leak-kinds=definite $(BUILD)/test_darknet_bn

# ---- Darknet itself (Debian's package: /usr/lib/darknet/{libdarknet.so,include/darknet.h}) ----
# make darknet-shim  build/libdarknet_bn_darknet.so: Darknet's forward_/backward_batchnorm_layer(layer, network)
#                    on darknet_bn's fused layer (csrc/darknet_abi/), compiled against DARKNET_INCLUDE's darknet.h
# make test-darknet  installs Debian's darknet when missing, then trains a small network on it three ways
#                    (plain, kernels preloaded, Darknet-ABI layer preloaded) and compares (tests/test_darknet.py)
DARKNET_DIR ?= /usr/lib/darknet
DARKNET_INCLUDE ?= $(DARKNET_DIR)/include

$(BUILD)/libdarknet_bn_darknet.so: csrc/darknet_abi/darknet_abi.c csrc/darknet_abi/darknet_bn_darknet.h csrc/darknet_bn.h $(BUILD)/libdarknet_bn.so
	@test -f "$(DARKNET_INCLUDE)/darknet.h" || { echo "no $(DARKNET_INCLUDE)/darknet.h: apt-get install darknet," \
		"or set DARKNET_INCLUDE to the folder of your Darknet's darknet.h" >&2; exit 2; }
	$(CC) $(CFLAGS_LIB) -shared -I"$(DARKNET_INCLUDE)" -Icsrc -Icsrc/darknet_abi $< -L$(BUILD) -ldarknet_bn \
		-Wl,-rpath,'$$ORIGIN' -o $@ $(LDLIBS)

darknet-shim: $(BUILD)/libdarknet_bn_darknet.so

$(BUILD)/darknet_driver: tests/darknet/driver.c
	@test -f "$(DARKNET_INCLUDE)/darknet.h" || { echo "no $(DARKNET_INCLUDE)/darknet.h (apt-get install darknet)" >&2; exit 2; }
	@mkdir -p $(BUILD)
	$(CC) -std=c11 -O2 -Wall -Wextra -Werror -I"$(DARKNET_INCLUDE)" $< -L"$(DARKNET_DIR)" -ldarknet \
		-Wl,-rpath,"$(DARKNET_DIR)" -o $@ -lm -pthread

darknet-installed:
	test -f "$(DARKNET_DIR)/libdarknet.so" || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends darknet)

test-darknet: darknet-installed venv
	$(MAKE) darknet-shim $(BUILD)/darknet_driver
	$(VPY) -m pytest tests/test_darknet.py -v -rs

# A Darknet training step on Debian's library with and without darknet_bn (benchmarks/bench_darknet.py).
bench-darknet: darknet-installed
	$(MAKE) darknet-shim $(BUILD)/darknet_driver
	$(PYTHON) benchmarks/bench_darknet.py $(BENCH_DARKNET_ARGS)

# The phases over MPI in C (examples/mpi_phases.c), with the mpicc and mpiexec of the pip MPI in .venv.
MPICC ?= $(VENV)/bin/mpicc
MPIEXEC ?= $(VENV)/bin/mpiexec
$(BUILD)/mpi_phases: examples/mpi_phases.c $(BUILD)/libdarknet_bn.a | $(VENV)/.installed
	$(MPICC) $(CFLAGS_LIB) -Icsrc $< $(BUILD)/libdarknet_bn.a -o $@ $(LDLIBS)

mpi-example: $(BUILD)/mpi_phases
	$(MPIEXEC) -n 3 $(BUILD)/mpi_phases

# The development environment: the package installed editable (the extension
# is compiled in place from csrc/) with the test, torch, demo, bench and mpi extras.
$(VENV)/.installed: pyproject.toml setup.py $(LIB_SRCS) $(HEADERS) darknet_bn/_ffi_build.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip setuptools wheel cffi
	$(VPY) -m pip install --quiet -e ".[test,torch,demo,bench,mpi]"
	touch $@

venv: $(VENV)/.installed

pytest: venv
	$(VPY) -m pytest tests -q -rs

# Tools the Python tests use (tests/test_install.py runs pkg-config), installed when missing.
tools:
	command -v pkg-config >/dev/null || (apt-get update -qq && apt-get install -y -qq pkg-config)

test: all flavors ctest sanitize fuzz valgrind tools pytest

demo: venv
	$(VPY) -m darknet_bn.demo $(DEMO_ARGS)

BENCH_ARGS ?= --omp-passive
bench: venv
	$(VPY) -m darknet_bn.bench $(BENCH_ARGS)
	$(VPY) benchmarks/bench_distributed.py

# Instructions per value of the layer's calls (callgrind; independent of the machine's load):
# a fully connected shape (the spatial == 1 path) and a convolutional one.
count-instructions: $(BUILD)/count_instructions
	benchmarks/count_instructions.sh 64 1024 1 1 10
	benchmarks/count_instructions.sh 8 128 52 52 3

bench-c: $(BUILD)/bench_batchnorm
	$(BUILD)/bench_batchnorm $(BENCH_C_ARGS)

# Installation of the C library: lib/libdarknet_bn.{a,so}, include/darknet_bn.h and
# lib/pkgconfig/darknet_bn.pc (from darknet_bn.pc.in, with the prefix and the version), so that
#   cc prog.c $(pkg-config --cflags --libs darknet_bn)
# builds a program against it (PKG_CONFIG_PATH=$(PREFIX)/lib/pkgconfig for a non-system prefix;
# at run time such a program needs -Wl,-rpath,<libdir>, LD_LIBRARY_PATH, or the static archive).
# For the default prefix, on the loader's path, install refreshes the loader's cache (ldconfig).
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
INSTALL ?= install
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml)
# Paths under the prefix are written as $${prefix}/... so a moved tree can be fixed with --define-prefix.
PC_LIBDIR = $(patsubst $(PREFIX)/%,$${prefix}/%,$(LIBDIR))
PC_INCLUDEDIR = $(patsubst $(PREFIX)/%,$${prefix}/%,$(INCLUDEDIR))

install: $(BUILD)/libdarknet_bn.so $(BUILD)/libdarknet_bn.a darknet_bn.pc.in
	$(INSTALL) -d "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(INCLUDEDIR)" "$(DESTDIR)$(PKGCONFIGDIR)"
	$(INSTALL) -m 644 $(BUILD)/libdarknet_bn.a "$(DESTDIR)$(LIBDIR)/libdarknet_bn.a"
	$(INSTALL) -m 755 $(BUILD)/libdarknet_bn.so "$(DESTDIR)$(LIBDIR)/libdarknet_bn.so"
	$(INSTALL) -m 644 csrc/darknet_bn.h "$(DESTDIR)$(INCLUDEDIR)/darknet_bn.h"
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@LIBDIR@|$(PC_LIBDIR)|g' -e 's|@INCLUDEDIR@|$(PC_INCLUDEDIR)|g' \
		-e 's|@VERSION@|$(VERSION)|g' darknet_bn.pc.in > "$(DESTDIR)$(PKGCONFIGDIR)/darknet_bn.pc"
	chmod 644 "$(DESTDIR)$(PKGCONFIGDIR)/darknet_bn.pc"
	@if [ -z "$(DESTDIR)" ] && [ "$(LIBDIR)" = /usr/local/lib ] && command -v ldconfig >/dev/null; then \
		ldconfig 2>/dev/null || true; fi

uninstall:
	rm -f "$(DESTDIR)$(LIBDIR)/libdarknet_bn.a" "$(DESTDIR)$(LIBDIR)/libdarknet_bn.so" \
		"$(DESTDIR)$(INCLUDEDIR)/darknet_bn.h" "$(DESTDIR)$(PKGCONFIGDIR)/darknet_bn.pc"

# The Python distributions: an sdist and a wheel built from it (python -m build, isolated),
# then the sdist pip-installed into a fresh virtual environment, where the extension is
# compiled from the sdist's csrc/, and a smoke test run there. Needs the package registry.
DIST := $(BUILD)/dist
dist-check: venv
	rm -rf $(DIST) $(BUILD)/dist-venv
	$(VPY) -m pip install --quiet build
	$(VPY) -m build --outdir $(DIST) .
	$(PYTHON) -m venv $(BUILD)/dist-venv
	$(BUILD)/dist-venv/bin/python -m pip install --quiet $(DIST)/darknet_bn-$(VERSION).tar.gz
	cd $(BUILD) && dist-venv/bin/python -c "import numpy as np, darknet_bn; \
		l = darknet_bn.BatchNormLayer(4, 2, 2, 3); y = l.forward(np.arange(48, dtype=np.float32).reshape(4, 3, 2, 2)); \
		assert abs(float(y.mean())) < 1e-5, y.mean(); print('dist-check ok:', darknet_bn.__file__, darknet_bn.info())"
	cd $(BUILD) && dist-venv/bin/python -m darknet_bn info

clean:
	rm -rf $(BUILD) darknet_bn/_darknet_bn*.so darknet_bn/_darknet_bn.c darknet_bn/_darknet_bn.o *.egg-info
