// Mask- and weight-aware iterative sigma clipping over the frames of a tile, then the (weighted) mean of the
// kept samples. Reference: dwarf3gpu/stack.py (sigma_clip_mask_aware), which follows
// astropy.stats.sigma_clip: per pixel, bounds centre - sigma_lower * spread and centre + sigma_upper * spread
// are computed from the samples kept so far, samples outside are dropped, until nothing changes, nothing is
// left or maxiters bounds were computed; the LAST bounds then decide, over all valid samples, which are kept.
//
// One thread per output pixel (channel, pixel), looping over the frames; no sample is moved between threads.
// Centre: median (mean of the two middle values for an even count) or mean; spread: population standard
// deviation (two-pass, float64 sums) or mad_std = 1.482602218505602 x the median absolute deviation.
//
// Algorithm (as the reference's, per pixel): the valid samples are gathered once into a per-thread array of
// D3_CLIP_MAX_FRAMES floats (local memory on the GPU) and sorted ONCE; since every bound pair is an interval,
// the kept set of each iteration is a contiguous range [a, b) of the sorted samples, so the median is read at
// two indices, the MAD is the k-th smallest |x - median| over the range (a binary search for the window of
// the k + 1 samples nearest the median), a bound update moves the two ends inwards, and the final kept set
// (all valid samples within the last bounds) is a range found by two binary searches. The sort: a counting
// ("rank") sort for up to D3_CLIP_RANK_MAX samples (O(n^2) compares without branches, which the CPU build
// vectorises), else rank-sorted runs of D3_CLIP_RUN samples merged bottom-up (branch-free merges from both ends
// at once); no recursion, no shared memory. More valid samples than D3_CLIP_MAX_FRAMES: a mean/std clip falls
// back to re-reading the frames (no sort needed), a median or MAD clip marks the pixel (rejected = -1; the
// Python wrappers never launch such a tile).
#include "common.cuh"

// Most valid samples per pixel of a sorted clip (the size of the two per-thread arrays); the Python side reads
// this value from here (kernels.define_value). A multiple of D3_CLIP_RUN.
#define D3_CLIP_MAX_FRAMES 512

// Up to this many samples the whole array is rank-sorted; beyond, runs of D3_CLIP_RUN are rank-sorted and merged.
#define D3_CLIP_RANK_MAX 128
#define D3_CLIP_RUN 64

#define D3_MAD_TO_STD 1.482602218505602

// The samples of one output pixel: stack[f * frame_stride] is frame f's value, valid[f * valid_stride] its
// flag (when valid is not null), weights[f * weight_stride] its weight (when weights is not null).
struct d3_samples {
    const float* stack;
    const unsigned char* valid;
    const float* weights;
    const double* frame_weights;
    long long frame_stride, valid_stride, weight_stride;
    int n_frames;
};

D3_DEVICE bool d3_sample_valid(const d3_samples& s, int f, float x) {
    return d3_finite(x) && (s.valid == 0 || s.valid[f * s.valid_stride] != 0);
}

// Count, mean and population standard deviation (two-pass, float64, frame order) of the valid samples
// within [lo, hi], re-reading the frames (the path for more valid samples than the per-thread arrays hold).
D3_DEVICE int d3_moments(const d3_samples& s, double lo, double hi, double* mean, double* std) {
    int count = 0;
    double sum = 0.0;
    for (int f = 0; f < s.n_frames; ++f) {
        const float x = s.stack[f * s.frame_stride];
        if (d3_sample_valid(s, f, x) && x >= lo && x <= hi) {
            ++count;
            sum += x;
        }
    }
    *mean = sum / count;
    double sq = 0.0;
    for (int f = 0; f < s.n_frames; ++f) {
        const float x = s.stack[f * s.frame_stride];
        if (d3_sample_valid(s, f, x) && x >= lo && x <= hi) {
            const double d = x - *mean;
            sq += d * d;
        }
    }
    *std = sqrt(sq / count);
    return count;
}

// ----------------------------------------------------------------------------------------------- sorting

// out[0, n) = in[0, n) sorted ascending, by counting: in[i] goes to out[#{j: in[j] < in[i]}]. n^2 compares and
// no data-dependent branch; the compare loops have a fixed trip count (in[n, m) is padded with +inf up to m, the
// next multiple of 8, so `in` needs room for m values) and rank four samples per pass, which a C++ compiler
// vectorises. Equal samples land on the same slot, the first of their block, and leave the rest of the block
// at its initial -inf; then (only when the ranks are not a permutation, i.e. their sum is not n (n - 1) / 2)
// a running maximum fills each such slot with the value before it.
D3_DEVICE void d3_rank_sort(float* in, float* out, int n) {
    const float inf = __int_as_float(0x7f800000);
    const int m = (n + 7) & ~7;
    for (int i = n; i < m; ++i) in[i] = inf;
    for (int i = 0; i < n; ++i) out[i] = -inf;
    int rank_sum = 0, i = 0;
    for (; i + 4 <= n; i += 4) {
        const float x0 = in[i], x1 = in[i + 1], x2 = in[i + 2], x3 = in[i + 3];
        int r0 = 0, r1 = 0, r2 = 0, r3 = 0;
        for (int j = 0; j < m; ++j) {
            const float v = in[j];
            r0 += v < x0 ? 1 : 0;
            r1 += v < x1 ? 1 : 0;
            r2 += v < x2 ? 1 : 0;
            r3 += v < x3 ? 1 : 0;
        }
        out[r0] = x0;
        out[r1] = x1;
        out[r2] = x2;
        out[r3] = x3;
        rank_sum += (r0 + r1) + (r2 + r3);
    }
    for (; i < n; ++i) {
        const float x = in[i];
        int r = 0;
        for (int j = 0; j < m; ++j) r += in[j] < x ? 1 : 0;
        out[r] = x;
        rank_sum += r;
    }
    if (rank_sum != n * (n - 1) / 2) {
        float previous = out[0];
        for (int p = 1; p < n; ++p) {
            const float v = out[p];
            previous = previous > v ? previous : v;
            out[p] = previous;
        }
    }
}

// Merge the sorted runs left[0, w) and right[0, w) into out[0, 2w), from both ends at once: step k writes the
// k-th smallest (ties from the left run first) and the k-th largest (ties from the right run first), the two
// halves of a stable merge. After k < w steps from either end at most k samples of a run are used, so no index
// leaves its run and the loop needs no bounds checks.
D3_DEVICE void d3_merge_equal(const float* left, const float* right, int w, float* out) {
    int i = 0, j = 0, p = w - 1, q = w - 1;
    for (int k = 0; k < w; ++k) {
        const float a = left[i], b = right[j];
        const bool low_right = b < a;
        out[k] = low_right ? b : a;
        j += low_right ? 1 : 0;
        i += low_right ? 0 : 1;
        const float c = left[p], d = right[q];
        const bool high_left = c > d;
        out[2 * w - 1 - k] = high_left ? c : d;
        p -= high_left ? 1 : 0;
        q -= high_left ? 0 : 1;
    }
}

// Merge the sorted runs left[0, nl) and right[0, nr) (any lengths >= 1) into out[0, nl + nr), also from both
// ends at once (the front writes the first ceil(total / 2) values, the back the rest), with the reads clamped
// into the runs and an exhausted run never chosen, so unequal lengths need no branch either.
D3_DEVICE void d3_merge(const float* left, int nl, const float* right, int nr, float* out) {
    const int total = nl + nr, back = total / 2;
    int i = 0, j = 0, p = nl - 1, q = nr - 1;
    for (int k = 0; k <= back; ++k) {
        if (k < total - back) {
            const float a = left[i < nl ? i : nl - 1], b = right[j < nr ? j : nr - 1];
            const bool take_right = j < nr && (i >= nl || b < a);
            out[k] = take_right ? b : a;
            j += take_right ? 1 : 0;
            i += take_right ? 0 : 1;
        }
        if (k < back) {
            const float c = left[p >= 0 ? p : 0], d = right[q >= 0 ? q : 0];
            const bool take_left = p >= 0 && (q < 0 || c > d);
            out[total - 1 - k] = take_left ? c : d;
            p -= take_left ? 1 : 0;
            q -= take_left ? 0 : 1;
        }
    }
}

// Sort values[0, n) (n <= D3_CLIP_MAX_FRAMES) using scratch[0, n); returns the array holding the sorted values
// (values or scratch; the other one is overwritten).
D3_DEVICE float* d3_sort(float* values, float* scratch, int n) {
    if (n <= D3_CLIP_RANK_MAX) {
        d3_rank_sort(values, scratch, n);
        return scratch;
    }
    for (int start = 0; start < n; start += D3_CLIP_RUN)
        d3_rank_sort(values + start, scratch + start, n - start < D3_CLIP_RUN ? n - start : D3_CLIP_RUN);
    float* src = scratch;
    float* dst = values;
    for (int w = D3_CLIP_RUN; w < n; w *= 2) {
        for (int start = 0; start < n; start += 2 * w) {
            const int nl = n - start < w ? n - start : w;
            const int rest = n - start - nl;
            const int nr = rest < w ? rest : w;
            if (nr == w)
                d3_merge_equal(src + start, src + start + w, w, dst + start);
            else if (nr > 0)
                d3_merge(src + start, nl, src + start + nl, nr, dst + start);
            else
                for (int i = 0; i < nl; ++i) dst[start + i] = src[start + i];
        }
        float* t = src;
        src = dst;
        dst = t;
    }
    return src;
}

// ------------------------------------------------------------------------------------- sorted-range stats

// Median of the sorted range [a, b).
D3_DEVICE double d3_median(const float* sorted, int a, int b) {
    const int count = b - a;
    return 0.5 * ((double)sorted[a + count / 2] + (double)sorted[a + (count - 1) / 2]);
}

// k-th smallest (0-based) |X[i] - centre| over i in [a, b) of the sorted X, as stack._kth_deviation: the k + 1
// samples nearest centre form a window [i, i + k]; the answer is min_i max(centre - X[i], X[i + k] - centre),
// whose first term falls and second rises with i, so a binary search finds the first i with X[i + k] - centre
// >= centre - X[i]; the answer is min(X[i + k] - centre, centre - X[i - 1]) over the terms that exist. O(log n).
D3_DEVICE double d3_kth_deviation(const float* sorted, int a, int b, double centre, int k) {
    int first = a, stop = b - k;
    while (first < stop) {
        const int mid = (first + stop) >> 1;
        const double low = centre - sorted[mid];
        const double high = sorted[mid + k] - centre;
        if (high >= low)
            stop = mid;
        else
            first = mid + 1;
    }
    double best = d3_inf();
    if (first < b - k) best = sorted[first + k] - centre;
    if (first > a) {
        const double left = centre - sorted[first - 1];
        if (left < best) best = left;
    }
    return best;
}

// mad_std of the sorted range [a, b) around its median: the reference's 0.5 (d_{c/2} + d_{(c-1)/2}) x 1.4826...
D3_DEVICE double d3_mad_std(const float* sorted, int a, int b, double median) {
    const int count = b - a;
    const double d_high = d3_kth_deviation(sorted, a, b, median, count / 2);
    const double d_low = count % 2 ? d_high : d3_kth_deviation(sorted, a, b, median, (count - 1) / 2);
    double deviation = d_high;
    deviation += d_low;
    return 0.5 * deviation * D3_MAD_TO_STD;
}

// Sum of the float64 values of the sorted range [a, b) in four interleaved partial sums (order fixed).
D3_DEVICE double d3_range_sum(const float* sorted, int a, int b) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int i = a;
    for (; i + 4 <= b; i += 4) {
        s0 += sorted[i];
        s1 += sorted[i + 1];
        s2 += sorted[i + 2];
        s3 += sorted[i + 3];
    }
    for (; i < b; ++i) s0 += sorted[i];
    return (s0 + s1) + (s2 + s3);
}

// Mean and population standard deviation (two-pass, float64) of the sorted range [a, b).
D3_DEVICE void d3_range_moments(const float* sorted, int a, int b, double* mean, double* std) {
    const double m = d3_range_sum(sorted, a, b) / (b - a);
    double q0 = 0.0, q1 = 0.0, q2 = 0.0, q3 = 0.0;
    int i = a;
    for (; i + 4 <= b; i += 4) {
        const double d0 = sorted[i] - m, d1 = sorted[i + 1] - m, d2 = sorted[i + 2] - m, d3 = sorted[i + 3] - m;
        q0 += d0 * d0;
        q1 += d1 * d1;
        q2 += d2 * d2;
        q3 += d3 * d3;
    }
    for (; i < b; ++i) {
        const double d = sorted[i] - m;
        q0 += d * d;
    }
    *mean = m;
    *std = sqrt(((q0 + q1) + (q2 + q3)) / (b - a));
}

// First index i in [0, n) with sorted[i] >= lo (upper = 0) or sorted[i] > hi (upper = 1); n when none.
D3_DEVICE int d3_search(const float* sorted, int n, double bound, int upper) {
    int first = 0, stop = n;
    while (first < stop) {
        const int mid = (first + stop) >> 1;
        const bool before = upper ? sorted[mid] <= bound : sorted[mid] < bound;
        if (before)
            first = mid + 1;
        else
            stop = mid;
    }
    return first;
}

// ------------------------------------------------------------------------------------------------ kernel

// Sigma-clip every (channel, pixel) of a tile and write the mean of the kept samples, the number of valid
// samples (coverage) and the number of valid samples rejected.
//
// stack: (n_frames, channels) planes of float32 pixels, plane p starting at stack + p * stack_planes; the
//        first n_pixels of every plane are clipped (stack_planes = n_pixels for a contiguous tile; larger for
//        a chunk of pixels or a view of a bigger buffer: pass the pointer to the first pixel); non-finite
//        samples are invalid.
// valid: (n_frames, valid_channels) planes of uint8 flags, plane p at valid + p * valid_planes; valid_channels 1
//        (shared by the channels) or `channels`; valid_channels 0: every finite sample is valid (not read).
// weights: (n_frames, weight_channels) planes of float32 >= 0 at weights + p * weight_planes, as valid;
//        weight_channels 0: none.
// frame_weights: (n_frames,) float64 >= 0, read when has_frame_weights.
// With no weights at all the mean is sum / count of the kept samples in float64 (in frame order, the
// reference's value, when a mean centre or std spread keeps every valid sample; else four interleaved partial
// sums over the sorted kept range); otherwise sum(w x) / sum(w) in frame order with w = weight x frame_weight
// (float64), NaN where the kept weight is 0. maxiters 0: no limit.
// median_centre 1: median centre, 0: mean. mad_spread 1: mad_std spread, 0: std.
// Outputs (channels, n_pixels), contiguous: mean float32 (NaN when nothing is kept), coverage and rejected int32
// (rejected -1 marks a pixel with more valid samples than D3_CLIP_MAX_FRAMES when a sort is needed).
// 1-D grid over channels * n_pixels.
extern "C" __global__ void d3_sigma_clip(const float* stack, const unsigned char* valid, int valid_channels,
                                         const float* weights, int weight_channels, const double* frame_weights,
                                         int has_frame_weights, int n_frames, int channels, int n_pixels,
                                         long long stack_planes, long long valid_planes, long long weight_planes,
                                         double sigma_lower, double sigma_upper, int maxiters, int median_centre,
                                         int mad_spread, float* mean, int* coverage, int* rejected) {
    const long long k = d3_global_x();
    if (k >= (long long)channels * n_pixels) return;
    const long long channel = k / n_pixels, pixel = k % n_pixels;
    d3_samples s;
    s.stack = stack + channel * stack_planes + pixel;
    s.frame_stride = channels * stack_planes;
    s.valid = valid_channels ? valid + (valid_channels > 1 ? channel : 0) * valid_planes + pixel : 0;
    s.valid_stride = valid_channels * valid_planes;
    s.weights = weight_channels ? weights + (weight_channels > 1 ? channel : 0) * weight_planes + pixel : 0;
    s.weight_stride = weight_channels * weight_planes;
    s.frame_weights = has_frame_weights ? frame_weights : 0;
    s.n_frames = n_frames;
    const bool sorted_stats = median_centre || mad_spread;
    const bool weighted = weight_channels || has_frame_weights;
    const double inf = d3_inf();

    // Gather the valid samples in frame order, without a branch: every sample is written at the count so far,
    // only a valid one advances it (beyond D3_CLIP_MAX_FRAMES valid samples all go to the spare last slot).
    // With weights, the first D3_CLIP_RANK_MAX valid samples' weights w = weight x frame_weight go beside them, so
    // that the final weighted mean needs no second pass over the frames when they are all there (rank-sorted
    // arrays keep `gathered` intact).
    float gathered[D3_CLIP_MAX_FRAMES + 1], scratch[D3_CLIP_MAX_FRAMES];
    double gathered_w[D3_CLIP_RANK_MAX + 1];
    int n_valid = 0;
    for (int f = 0; f < n_frames; ++f) {
        const float x = s.stack[f * s.frame_stride];
        gathered[n_valid < D3_CLIP_MAX_FRAMES ? n_valid : D3_CLIP_MAX_FRAMES] = x;
        if (weighted) {
            double w = s.weights ? (double)s.weights[f * s.weight_stride] : 1.0;
            if (s.frame_weights) w = w * s.frame_weights[f];
            gathered_w[n_valid < D3_CLIP_RANK_MAX ? n_valid : D3_CLIP_RANK_MAX] = w;
        }
        n_valid += d3_sample_valid(s, f, x) ? 1 : 0;
    }
    coverage[k] = n_valid;
    if (n_valid == 0) {
        mean[k] = d3_nanf();
        rejected[k] = 0;
        return;
    }
    const bool fits = n_valid <= D3_CLIP_MAX_FRAMES;
    if (sorted_stats && !fits) {
        mean[k] = d3_nanf();
        rejected[k] = -1;
        return;
    }

    // A mean centre or a std spread: the first moments over all valid samples, two-pass in float64 and frame
    // order as the reference's, so the first bounds are bit-identical.
    const bool moments = !median_centre || !mad_spread;
    double total = 0.0, centre_mean = 0.0, std = 0.0;
    if (moments && fits) {
        for (int i = 0; i < n_valid; ++i) total += gathered[i];
        centre_mean = total / n_valid;
        double sq = 0.0;
        for (int i = 0; i < n_valid; ++i) {
            const double d = gathered[i] - centre_mean;
            sq += d * d;
        }
        std = sqrt(sq / n_valid);
    } else if (moments) {
        d3_moments(s, -inf, inf, &centre_mean, &std);
    }

    // The last bounds [lo, hi] and the number of valid samples within them (-1: counted by the frame pass
    // below); when sorted, those samples are the range [fa, fb) of the sorted array.
    double lo = centre_mean - sigma_lower * std, hi = centre_mean + sigma_upper * std;
    int n_kept = -1, fa = 0, fb = 0;
    const float* sorted = 0;
    if (!sorted_stats && fits) {  // mean/std: no sort when the first bounds keep every sample
        int outside = 0;
        for (int i = 0; i < n_valid; ++i) outside += gathered[i] < lo || gathered[i] > hi ? 1 : 0;
        if (outside == 0) n_kept = n_valid;
    }
    if (!fits) {
        // mean/std over more samples than the arrays hold: the kept set is valid ∩ [max lo, min hi] over the
        // bounds so far (an intersection of intervals), the moments re-read from the frames.
        double kept_lo = lo, kept_hi = hi;
        int count = n_valid;
        for (int iteration = 1;; ++iteration) {
            const int next = d3_moments(s, kept_lo, kept_hi, &centre_mean, &std);
            if (next == count || next == 0 || (maxiters > 0 && iteration >= maxiters)) break;
            count = next;
            lo = centre_mean - sigma_lower * std;
            hi = centre_mean + sigma_upper * std;
            kept_lo = fmax(kept_lo, lo);
            kept_hi = fmin(kept_hi, hi);
        }
    } else if (n_kept < 0) {
        // Sort once; the kept set of every iteration is then the range [a, b) of the sorted samples.
        const float* values = d3_sort(gathered, scratch, n_valid);
        sorted = values;
        double median = sorted_stats ? d3_median(values, 0, n_valid) : 0.0;
        double centre = median_centre ? median : centre_mean;
        double spread = mad_spread ? d3_mad_std(values, 0, n_valid, median) : std;
        int a = 0, b = n_valid, count = n_valid;
        for (int iteration = 1;; ++iteration) {
            lo = centre - sigma_lower * spread;
            hi = centre + sigma_upper * spread;
            while (a < b && values[a] < lo) ++a;
            while (a < b && values[b - 1] > hi) --b;
            const int next = b - a;
            if (next == count || next == 0 || (maxiters > 0 && iteration >= maxiters)) break;
            count = next;
            if (sorted_stats) median = d3_median(values, a, b);
            if (moments) d3_range_moments(values, a, b, &centre_mean, &std);
            centre = median_centre ? median : centre_mean;
            spread = mad_spread ? d3_mad_std(values, a, b, median) : std;
        }
        // The last bounds decide over all valid samples: a range of the sorted array.
        fa = d3_search(values, n_valid, lo, 0);
        fb = d3_search(values, n_valid, hi, 1);
        n_kept = fb - fa;
    }

    if (!weighted && n_kept >= 0) {
        if (n_kept == n_valid && moments)
            mean[k] = (float)(total / n_valid);  // the reference's frame-order mean
        else
            mean[k] = n_kept > 0 ? (float)(d3_range_sum(sorted, fa, fb) / n_kept) : d3_nanf();
        rejected[k] = n_valid - n_kept;
        return;
    }
    // Frame-order pass over the kept samples: the weighted mean (or the count and mean of the fallback path),
    // from the gathered samples and weights when they hold every valid sample (the same sums in the same order).
    int kept = 0;
    double num = 0.0, den = 0.0;
    if (weighted && n_valid <= D3_CLIP_RANK_MAX) {
        for (int i = 0; i < n_valid; ++i) {
            const float x = gathered[i];
            if (x >= lo && x <= hi) {
                ++kept;
                den += gathered_w[i];
                num += gathered_w[i] * x;
            }
        }
        mean[k] = den > 0.0 ? (float)(num / den) : d3_nanf();
        rejected[k] = n_valid - kept;
        return;
    }
    for (int f = 0; f < n_frames; ++f) {
        const float x = s.stack[f * s.frame_stride];
        if (!(d3_sample_valid(s, f, x) && x >= lo && x <= hi)) continue;
        ++kept;
        if (weighted) {
            double w = s.weights ? (double)s.weights[f * s.weight_stride] : 1.0;
            if (s.frame_weights) w = w * s.frame_weights[f];
            den += w;
            num += w * x;
        } else {
            num += x;
        }
    }
    if (!weighted) den = kept;
    mean[k] = den > 0.0 ? (float)(num / den) : d3_nanf();
    rejected[k] = n_valid - kept;
}
