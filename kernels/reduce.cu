// Deterministic image statistics: each thread reduces one fixed segment of the data and writes its own
// partial result; the host adds the partials in segment order. No atomics and no float accumulation across
// threads, so the result does not depend on the launch geometry, the GPU or the number of CPU threads.
#include "common.cuh"

// Segment s covers x[s * segment, min(n, (s + 1) * segment)). Over its finite values, in index order:
// count[s], sum[s] = sum(x - shift) and sum_sq[s] = sum((x - shift)^2), float64 (a shift near the mean
// keeps the variance free of cancellation). 1-D grid over the segments.
extern "C" __global__ void d3_segment_moments(const float* x, int n, int segment, double shift, int* count,
                                              double* sum, double* sum_sq) {
    const long long s = d3_global_x();
    const long long start = s * segment;
    if (start >= n) return;
    const long long stop = start + segment < n ? start + segment : n;
    int c = 0;
    double s1 = 0.0, s2 = 0.0;
    for (long long i = start; i < stop; ++i) {
        if (!d3_finite(x[i])) continue;
        const double d = x[i] - shift;
        ++c;
        s1 += d;
        s2 += d * d;
    }
    count[s] = c;
    sum[s] = s1;
    sum_sq[s] = s2;
}

// Histogram of segment s into counts[s * bins, (s + 1) * bins) over the `bins` uniform bins whose bins + 1
// edges (float64, increasing, numpy.linspace) are `edges`. The bin of a value is numpy.histogram's for float64
// edges: values outside [edges[0], edges[bins]] and NaN are not counted, the last bin is closed, and the
// index from the scaled offset is corrected against the edges themselves. 1-D grid over the segments.
extern "C" __global__ void d3_segment_histogram(const float* x, int n, int segment, const double* edges, int bins,
                                                int* counts) {
    const long long s = d3_global_x();
    const long long start = s * segment;
    if (start >= n) return;
    const long long stop = start + segment < n ? start + segment : n;
    int* hist = counts + s * bins;
    for (int b = 0; b < bins; ++b) hist[b] = 0;
    const double first = edges[0], last = edges[bins], span = last - first;
    for (long long i = start; i < stop; ++i) {
        const double v = x[i];
        if (!(v >= first && v <= last)) continue;
        long long b = (long long)(((v - first) / span) * bins);
        if (b == bins) --b;
        if (v < edges[b]) {
            --b;
        } else if (b != bins - 1 && v >= edges[b + 1]) {
            ++b;
        }
        ++hist[b];
    }
}
