# darknet_bn - build, test, benchmark, demo.
#
#   make          build/libdarknet_bn.so, build/libdarknet_bn.a, build/bench_batchnorm
#   make test     C tests (plain, under ASan+UBSan, under valgrind), then a virtual
#                 environment (.venv) with the package and its extras, then pytest
#   make demo     the batch-norm paper's experiment (python -m darknet_bn.demo)
#   make bench    the Python benchmark against PyTorch, NumPy and the reference path
#   make bench-c  the C benchmark (every kernel and the layer vs the reference loops)
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

.PHONY: all lib test ctest sanitize valgrind pytest venv demo bench bench-c clean

all: $(BUILD)/libdarknet_bn.so $(BUILD)/libdarknet_bn.a $(BUILD)/bench_batchnorm

lib: $(BUILD)/libdarknet_bn.so $(BUILD)/libdarknet_bn.a

$(BUILD)/obj/%.o: csrc/%.c $(HEADERS) csrc/rows.inc.h csrc/cflags.txt
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LIB) -c $< -o $@

$(BUILD)/libdarknet_bn.a: $(LIB_OBJS)
	rm -f $@
	ar rcs $@ $^

$(BUILD)/libdarknet_bn.so: $(LIB_OBJS)
	$(CC) -shared -o $@ $^ $(LDLIBS)

$(BUILD)/bench_batchnorm: benchmarks/bench_batchnorm.c $(BUILD)/libdarknet_bn.a
	$(CC) $(CFLAGS_LIB) -Icsrc $< $(BUILD)/libdarknet_bn.a -o $@ $(LDLIBS)

$(BUILD)/test_darknet_bn: $(wildcard tests/c/*.c tests/c/*.h) $(BUILD)/libdarknet_bn.a
	$(CC) $(CFLAGS_LIB) -Icsrc $(wildcard tests/c/*.c) $(BUILD)/libdarknet_bn.a -o $@ $(LDLIBS)

$(BUILD)/c_example: examples/c_example.c $(BUILD)/libdarknet_bn.a
	$(CC) $(CFLAGS_LIB) -Icsrc $< $(BUILD)/libdarknet_bn.a -o $@ $(LDLIBS)

ctest: $(BUILD)/test_darknet_bn $(BUILD)/c_example
	$(BUILD)/c_example
	$(BUILD)/test_darknet_bn

# The C tests again under AddressSanitizer + UndefinedBehaviorSanitizer, and
# under valgrind memcheck (installed with apt-get when missing).
SANFLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1
$(BUILD)/test_darknet_bn_asan: $(LIB_SRCS) $(HEADERS) csrc/rows.inc.h $(wildcard tests/c/*.c tests/c/*.h)
	@mkdir -p $(BUILD)
	$(CC) $(filter-out -O3,$(CFLAGS_LIB)) $(SANFLAGS) -Icsrc $(LIB_SRCS) $(wildcard tests/c/*.c) -o $@ $(LDLIBS)

sanitize: $(BUILD)/test_darknet_bn_asan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 $(BUILD)/test_darknet_bn_asan

valgrind: $(BUILD)/test_darknet_bn
	command -v valgrind >/dev/null || (apt-get update -qq && apt-get install -y -qq valgrind)
	valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
		--show-leak-kinds=definite $(BUILD)/test_darknet_bn

# The development environment: the package installed editable (the extension
# is compiled in place from csrc/) with the test, torch, demo and bench extras.
$(VENV)/.installed: pyproject.toml setup.py $(LIB_SRCS) $(HEADERS) darknet_bn/_ffi_build.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip setuptools wheel cffi
	$(VPY) -m pip install --quiet -e ".[test,torch,demo,bench]"
	touch $@

venv: $(VENV)/.installed

pytest: venv
	$(VPY) -m pytest tests -q

test: all ctest sanitize valgrind pytest

demo: venv
	$(VPY) -m darknet_bn.demo $(DEMO_ARGS)

bench: venv
	$(VPY) -m darknet_bn.bench $(BENCH_ARGS)

bench-c: $(BUILD)/bench_batchnorm
	$(BUILD)/bench_batchnorm $(BENCH_C_ARGS)

clean:
	rm -rf $(BUILD) darknet_bn/_darknet_bn*.so darknet_bn/_darknet_bn.c darknet_bn/_darknet_bn.o *.egg-info
