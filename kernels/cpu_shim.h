// CPU target of the dwarf3gpu kernels: the CUDA names the kernels use, defined for a C++ compiler, so the
// same .cu files compile with  g++ -x c++ -std=c++17 -O3 -fopenmp -ffp-contract=off -fPIC -shared.
//
// A "thread" is one call of the kernel function with threadIdx/blockIdx set; the launchers that
// dwarf3gpu/backends/cpu_build.py generates run the blocks of a grid in an OpenMP parallel loop and the
// threads of a block one after another. The kernels never communicate between threads (no __shared__,
// __syncthreads, atomics or warp intrinsics), so this order gives the GPU's results.
#pragma once

#include <cmath>
#include <cstring>

#define __global__ inline __attribute__((always_inline))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))

struct d3_uint3 {
    unsigned int x, y, z;
};

// Per OpenMP thread: the position of the kernel call being run and the launch geometry.
static thread_local d3_uint3 threadIdx, blockIdx, blockDim, gridDim;

using std::floor;
using std::fmax;
using std::fmin;
using std::sqrt;

// CUDA's bit reinterpretation intrinsic.
inline float __int_as_float(int bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

#ifdef _OPENMP
#include <omp.h>
#endif

// OpenMP threads of a launch; 0 uses OpenMP's default (OMP_NUM_THREADS or every core).
static int d3_cpu_threads = 0;

// Run a grid: blocks in an OpenMP parallel loop (dynamic schedule: clipping costs vary per pixel), the
// threads of a block in order (x fastest), each a call of `kernel` with blockIdx/threadIdx set.
template <class Kernel>
static void d3_run_grid(unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by,
                        unsigned int bz, Kernel kernel) {
    const long long blocks = (long long)gx * gy * gz;
#ifdef _OPENMP
    const int threads = d3_cpu_threads > 0 ? d3_cpu_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
    for (long long b = 0; b < blocks; ++b) {
        gridDim = {gx, gy, gz};
        blockDim = {bx, by, bz};
        blockIdx = {(unsigned int)(b % gx), (unsigned int)(b / gx % gy), (unsigned int)(b / ((long long)gx * gy))};
        const Kernel run = kernel;  // a private copy: its captured arguments can live in registers
        for (unsigned int z = 0; z < bz; ++z)
            for (unsigned int y = 0; y < by; ++y)
                for (unsigned int x = 0; x < bx; ++x) {
                    threadIdx = {x, y, z};
                    run();
                }
    }
}
