// Shared helpers of the dwarf3gpu kernels: thread indexing, Bayer sites, portable float tests.
//
// Every kernel is written "one thread per output element" with no __shared__ memory, __syncthreads,
// atomics or warp intrinsics, so each .cu file compiles unchanged for two targets:
//   - the GPU, with NVRTC or nvcc (options --fmad=false: no contraction of a * b + c into an FMA, so the
//     float arithmetic is the NumPy reference's, operation for operation);
//   - the CPU, with a C++ compiler through cpu_shim.h (g++ -x c++ -fopenmp -ffp-contract=off), where a
//     generated launcher runs the grid as an OpenMP loop over blocks.
// Sizes are passed as int (each below 2**31); flat offsets are computed in 64 bits (long long).
#pragma once

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#include "cpu_shim.h"
#endif

#define D3_DEVICE __device__ __forceinline__

// Marks a loop whose iterations are independent lanes of one thread's work (e.g. the taps of a filter): the
// CPU build runs them in SIMD lanes (OpenMP simd); on the GPU it is a plain loop.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define D3_SIMD
#else
#define D3_SIMD _Pragma("omp simd")
#endif

// Bayer pattern codes: the pattern name's index in ("RGGB", "GRBG", "GBRG", "BGGR"). The red site of the
// 2x2 cell is then (code >> 1, code & 1), blue the opposite corner, the greens the other diagonal.
#define D3_RGGB 0
#define D3_GRBG 1
#define D3_GBRG 2
#define D3_BGGR 3
#define D3_MONO (-1)

#define D3_RED 0
#define D3_GREEN 1
#define D3_BLUE 2

// Interpolation codes of the warps.
#define D3_BILINEAR 0
#define D3_BICUBIC 1

// x index of this thread over the whole grid (64-bit).
D3_DEVICE long long d3_global_x() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }

// y index of this thread over the whole grid (64-bit).
D3_DEVICE long long d3_global_y() { return (long long)blockIdx.y * blockDim.y + threadIdx.y; }

// Colour (D3_RED, D3_GREEN, D3_BLUE) of the pixel at ABSOLUTE frame position (row, col).
D3_DEVICE int d3_bayer_colour(int pattern, long long row, long long col) {
    const int r = (int)(row & 1), c = (int)(col & 1);
    const int red_r = pattern >> 1, red_c = pattern & 1;
    if (r == red_r && c == red_c) return D3_RED;
    if (r != red_r && c != red_c) return D3_BLUE;
    return D3_GREEN;
}

// True for a finite float (false for NaN and +-inf) without relying on a math library.
D3_DEVICE bool d3_finite(float x) { return fabsf(x) <= 3.402823466e38f; }

// Quiet NaN of type float, built without a math library.
D3_DEVICE float d3_nanf() { return __int_as_float(0x7fc00000); }

// +infinity as a double, built without a math library.
D3_DEVICE double d3_inf() { return (double)__int_as_float(0x7f800000); }
