# fpdt: `make` builds ./fpdt, `make test` builds and runs the GoogleTest suite.
# With the CUDA toolkit's nvcc (on PATH, or NVCC=/path/to/nvcc) the program is built by nvcc and
# has both backends: CUDA runtime API only, never libcuda, so the binary starts on a machine
# without a GPU or driver and runs on the CPU there. Without nvcc (or with NVCC=false) the same
# sources are built by g++ into a CPU-only ./fpdt, and the GPU tests are left out of the suite.
# MPI comes from OpenMPI's mpicxx wrapper.
NVCC ?= nvcc
CXX ?= g++
MPI_CFLAGS := $(shell mpicxx --showme:compile 2>/dev/null)
MPI_LIBS := $(shell mpicxx --showme:link 2>/dev/null)
ifeq ($(MPI_LIBS),)
$(error OpenMPI not found: install it with `apt-get install -y libopenmpi-dev openmpi-bin`)
endif
HAVE_NVCC := $(shell $(NVCC) --version >/dev/null 2>&1 && echo 1)
BUILD_KIND := $(if $(HAVE_NVCC),cuda,cpu)
# -fno-trapping-math: fpdt never enables FP exceptions, and without it GCC will not turn a
# conditional in the CPU softmax loops (attn_exp) into a vector select except where AVX-512 masks
# hide it: the AVX2 and baseline attention ran scalar, 2-3x slower. Results stay IEEE (no
# reassociation, no finite-math assumptions). -fno-math-errno: fpdt never reads errno after a math
# call, and without it GCC keeps a libm call beside each sqrtf (errno on a negative argument), so
# the AdamW loop did not vectorize. The same sqrt either way.
HOST_FLAGS := -O3 -fopenmp -fno-trapping-math -fno-math-errno -Wall -Wno-unused-function
DEFS := -DOMPI_SKIP_MPICXX
# Device code for Ampere (A100, sm_80; sm_86/sm_89 run it too, but their 99 KiB of shared memory per
# block holds the attention kernels only up to head size 314: a larger one is refused at the start
# of a run, naming the limit) and Hopper (H100/H200, sm_90), plus PTX that newer GPUs compile at
# load time. A GPU on this machine of another major architecture (nvidia-smi's compute_cap) is
# added. Override: make GPU_ARCH="-gencode ..." (test/gpu_check.sh builds for the local GPU alone).
comma := ,
LOCAL_SM := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
EXTRA_SM := $(if $(filter-out 80 86 87 89 90,$(LOCAL_SM)),-gencode arch=compute_$(LOCAL_SM)$(comma)code=sm_$(LOCAL_SM))
GPU_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	-gencode arch=compute_90,code=compute_90 $(EXTRA_SM)
NVCC_FLAGS := -O3 -std=c++17 $(GPU_ARCH) $(DEFS) -Xcompiler "$(HOST_FLAGS)" $(MPI_CFLAGS)
CXXFLAGS_T := -O2 -g -std=c++17 $(DEFS) $(HOST_FLAGS) $(MPI_CFLAGS) -I.
HEADERS := $(wildcard *.h *.cuh data/*.h)
TEST_SRC := $(wildcard test/test_*.cpp)  # one binary; test/mpi_layout.cpp is its own (run under mpirun)
TEST_OBJ := $(TEST_SRC:test/%.cpp=build/%.o)
# GPU tests: built by nvcc into the same binary; they skip themselves where there is no GPU.
# Without nvcc they are not built at all.
GPU_TEST_SRC := $(if $(HAVE_NVCC),$(wildcard test/test_gpu*.cu))
GPU_TEST_OBJ := $(GPU_TEST_SRC:test/%.cu=build/%.o)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell which $(NVCC)))
CUDA_LIBS := $(if $(HAVE_NVCC),-L$(CUDA_HOME)/lib64 -lcudart -lcublas -lnccl)

all: fpdt

# build/kind holds "cuda" or "cpu": switching between the two rebuilds ./fpdt
build/kind: FORCE
	@mkdir -p build
	@[ "$$(cat $@ 2>/dev/null)" = "$(BUILD_KIND)" ] || echo $(BUILD_KIND) > $@

fpdt: fpdt.cu $(HEADERS) build/kind
ifeq ($(HAVE_NVCC),1)
	$(NVCC) $(NVCC_FLAGS) fpdt.cu -o $@ -lcudart -lcublas -lnccl -lgomp $(MPI_LIBS)
	@echo "built ./fpdt with nvcc: CPU and CUDA backends ($(filter code=%,$(subst $(comma), ,$(GPU_ARCH))))"
else
	$(CXX) -x c++ -O3 -std=c++17 $(DEFS) $(HOST_FLAGS) $(MPI_CFLAGS) fpdt.cu -x none -o $@ $(MPI_LIBS)
	@echo "built ./fpdt with $(CXX): CPU backend only ('$(NVCC)' not found; install the CUDA toolkit for the GPU backend)"
endif

build/%.o: test/%.cpp $(HEADERS) test/*.h
	@mkdir -p build
	$(CXX) $(CXXFLAGS_T) -c $< -o $@

build/%.o: test/%.cu $(HEADERS) test/*.h test/*.cuh
	@mkdir -p build
	$(NVCC) $(NVCC_FLAGS) -I. -c $< -o $@

build/fpdt_tests: $(TEST_OBJ) $(GPU_TEST_OBJ) build/kind
	$(CXX) $(CXXFLAGS_T) $(filter %.o,$^) -o $@ -lgtest -lgtest_main -pthread $(MPI_LIBS) $(CUDA_LIBS)

build/mpi_layout: test/mpi_layout.cpp $(HEADERS) test/*.h
	@mkdir -p build
	$(CXX) $(CXXFLAGS_T) $< -o $@ -lgtest -pthread $(MPI_LIBS)

# The tests run the real ./fpdt (and mpirun) as well as the headers. The last line is
# "N passed, N failed, N skipped" (what CI reads).
test: fpdt build/fpdt_tests build/mpi_layout
	@bash test/run_tests.sh ./build/fpdt_tests

# Reliability. `make sanitize`: the same test suite built with AddressSanitizer + UBSan (objects
# and binary in build/asan/), run like `make test`; any sanitizer report fails it. `make fuzz`:
# libFuzzer targets for the untrusted-input parsers (data shards and text, checkpoints), built
# with clang++ into build/fuzz_*, each run for FUZZ_RUNS inputs; any crash, leak, UB or timeout
# fails it. Crash inputs are written to build/fuzz/ (rerun one: ./build/fuzz_shard FILE).
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
SAN_ENV := ASAN_OPTIONS=halt_on_error=1:detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
ASAN_OBJ := $(TEST_SRC:test/%.cpp=build/asan/%.o)

build/asan/%.o: test/%.cpp $(HEADERS) test/*.h
	@mkdir -p build/asan
	$(CXX) $(CXXFLAGS_T) -O1 $(SAN_FLAGS) -c $< -o $@

build/asan/fpdt_tests: $(ASAN_OBJ)
	$(CXX) $(CXXFLAGS_T) -O1 $(SAN_FLAGS) $^ -o $@ -lgtest -lgtest_main -pthread $(MPI_LIBS)

sanitize: fpdt build/asan/fpdt_tests build/mpi_layout
	@$(SAN_ENV) bash test/run_tests.sh ./build/asan/fpdt_tests

FUZZ_CXX ?= $(or $(shell command -v clang++-14 2>/dev/null),$(shell command -v clang++ 2>/dev/null),clang++)
FUZZ_FLAGS := -g -O1 -std=c++17 $(DEFS) -fsanitize=fuzzer $(SAN_FLAGS) $(MPI_CFLAGS) -I.
FUZZ_RUNS ?= 20000
FUZZ_ARGS = -runs=$(FUZZ_RUNS) -max_len=4096 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	-artifact_prefix=build/fuzz/

# (mpi.h is included for its types only: no MPI library is linked)
build/fuzz_%: test/fuzz_%.cpp $(HEADERS)
	@mkdir -p build
	$(FUZZ_CXX) $(FUZZ_FLAGS) $< -o $@

fuzz: build/fuzz_shard build/fuzz_checkpoint
	@mkdir -p build/fuzz/shard build/fuzz/checkpoint build/fuzz/seeds
	python3 test/fuzz_seeds.py build/fuzz/seeds
	$(SAN_ENV) ./build/fuzz_shard $(FUZZ_ARGS) -dict=test/fuzz_shard.dict build/fuzz/shard build/fuzz/seeds/shard
	$(SAN_ENV) ./build/fuzz_checkpoint $(FUZZ_ARGS) -dict=test/fuzz_checkpoint.dict build/fuzz/checkpoint build/fuzz/seeds/checkpoint

.PHONY: sanitize fuzz

clean:
	rm -rf fpdt build

.PHONY: all test clean FORCE
