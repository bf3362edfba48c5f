# fpdt: `make` builds ./fpdt, `make test` builds and runs the GoogleTest suite.
# nvcc compiles the program (CUDA runtime API only, never libcuda: the binary starts on a machine
# without a GPU or driver and runs on the CPU there). MPI comes from OpenMPI's mpicxx wrapper.
NVCC ?= nvcc
CXX ?= g++
MPI_CFLAGS := $(shell mpicxx --showme:compile 2>/dev/null)
MPI_LIBS := $(shell mpicxx --showme:link 2>/dev/null)
ifeq ($(MPI_LIBS),)
$(error OpenMPI not found: install it with `apt-get install -y libopenmpi-dev openmpi-bin`)
endif
HOST_FLAGS := -O3 -fopenmp -Wall -Wno-unused-function
DEFS := -DOMPI_SKIP_MPICXX
NVCC_FLAGS := -O3 -std=c++17 $(DEFS) -Xcompiler "$(HOST_FLAGS)" $(MPI_CFLAGS)
CXXFLAGS_T := -O2 -g -std=c++17 $(DEFS) $(HOST_FLAGS) $(MPI_CFLAGS) -I.
HEADERS := $(wildcard *.h *.cuh data/*.h)
TEST_SRC := $(wildcard test/test_*.cpp)  # one binary; test/mpi_layout.cpp is its own (run under mpirun)
TEST_OBJ := $(TEST_SRC:test/%.cpp=build/%.o)

all: fpdt

fpdt: fpdt.cu $(HEADERS)
	$(NVCC) $(NVCC_FLAGS) fpdt.cu -o $@ -lcudart -lgomp $(MPI_LIBS)

build/%.o: test/%.cpp $(HEADERS) test/*.h
	@mkdir -p build
	$(CXX) $(CXXFLAGS_T) -c $< -o $@

build/fpdt_tests: $(TEST_OBJ)
	$(CXX) $(CXXFLAGS_T) $^ -o $@ -lgtest -lgtest_main -pthread $(MPI_LIBS)

build/mpi_layout: test/mpi_layout.cpp $(HEADERS)
	@mkdir -p build
	$(CXX) $(CXXFLAGS_T) $< -o $@ -lgtest -pthread $(MPI_LIBS)

# The tests run the real ./fpdt (and mpirun) as well as the headers. The last line is
# "N passed, N failed" (what CI reads).
test: fpdt build/fpdt_tests build/mpi_layout
	@bash test/run_tests.sh ./build/fpdt_tests

clean:
	rm -rf fpdt build

.PHONY: all test clean
