// Mask- and weight-aware iterative sigma clipping over the frames of a tile, then the (weighted) mean of the
// kept samples. Reference: dwarf3gpu/stack.py (sigma_clip_mask_aware), which follows
// astropy.stats.sigma_clip: per pixel, bounds centre - sigma_lower * spread and centre + sigma_upper * spread
// are computed from the samples kept so far, samples outside are dropped, until nothing changes, nothing is
// left or maxiters bounds were computed; the LAST bounds then decide, over all valid samples, which are kept.
//
// One thread per output pixel (channel, pixel), looping over the frames; no sample is moved between threads.
// Centre: median (mean of the two middle values for an even count) or mean; spread: population standard
// deviation (two-pass, float64 sums) or mad_std = 1.482602218505602 x the median absolute
// deviation. The median and MAD come from the pixel's valid samples sorted in a per-thread array of
// D3_CLIP_MAX_FRAMES floats (local memory on the GPU): with a median centre or a MAD spread a tile may hold
// at most that many frames (the Python wrapper refuses more); mean/std needs no sort and has no limit.
#include "common.cuh"

// Most valid samples per pixel of a median or MAD clip (the size of the per-thread sort array); the Python
// side reads this value from here (kernels.define_value).
#define D3_CLIP_MAX_FRAMES 512

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
// within [lo, hi].
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

// Sort values[0, n) ascending by insertion: no recursion, no extra memory, about n^2 / 4 moves for samples
// in random order (fine for the tens of frames of a tile; it is most of the clip's cost on the CPU).
D3_DEVICE void d3_sort(float* values, int n) {
    for (int i = 1; i < n; ++i) {
        const float v = values[i];
        int j = i;
        for (; j > 0 && values[j - 1] > v; --j) values[j] = values[j - 1];
        values[j] = v;
    }
}

// Mean and population standard deviation (two-pass, float64) of the sorted range [a, b).
D3_DEVICE void d3_range_moments(const float* sorted, int a, int b, double* mean, double* std) {
    double sum = 0.0;
    for (int i = a; i < b; ++i) sum += sorted[i];
    *mean = sum / (b - a);
    double sq = 0.0;
    for (int i = a; i < b; ++i) {
        const double d = sorted[i] - *mean;
        sq += d * d;
    }
    *std = sqrt(sq / (b - a));
}

// Median of the sorted range [a, b).
D3_DEVICE double d3_median(const float* sorted, int a, int b) {
    const int count = b - a;
    return 0.5 * ((double)sorted[a + count / 2] + (double)sorted[a + (count - 1) / 2]);
}

// mad_std of the sorted range [a, b) around `median`: the k-th smallest |x - median| for k = count / 2 and
// (count - 1) / 2, found by merging the deviations on both sides of the median (each side is sorted).
D3_DEVICE double d3_mad_std(const float* sorted, int a, int b, double median) {
    const int count = b - a, k_high = count / 2, k_low = (count - 1) / 2;
    int right = a;
    while (right < b && sorted[right] < median) ++right;
    int left = right - 1;
    double d_low = 0.0, d_high = 0.0;
    for (int k = 0; k <= k_high; ++k) {
        double d;
        const bool take_right = left < a || (right < b && sorted[right] - median <= median - sorted[left]);
        if (take_right) {
            d = sorted[right] - median;
            ++right;
        } else {
            d = median - sorted[left];
            --left;
        }
        if (k == k_low) d_low = d;
        if (k == k_high) d_high = d;
    }
    double deviation = d_high;
    deviation += d_low;
    return 0.5 * deviation * D3_MAD_TO_STD;
}

// Sigma-clip every (channel, pixel) of a tile and write the mean of the kept samples, the number of valid
// samples (coverage) and the number of valid samples rejected.
//
// stack: (n_frames, channels, n_pixels) float32; non-finite samples are invalid.
// valid: (n_frames, valid_channels, n_pixels) uint8 flags, valid_channels 1 (shared by the channels) or
//        `channels`; valid_channels 0: every finite sample is valid (valid is not read).
// weights: (n_frames, weight_channels, n_pixels) float32 >= 0, as valid; weight_channels 0: none.
// frame_weights: (n_frames,) float64 >= 0, read when has_frame_weights.
// With no weights at all the mean is sum / count (float64, frame order); otherwise sum(w x) / sum(w) with
// w = weight x frame_weight (float64), NaN where the kept weight is 0. maxiters 0: no limit.
// median_centre 1: median centre, 0: mean. mad_spread 1: mad_std spread, 0: std.
// Outputs (channels, n_pixels): mean float32 (NaN when nothing is kept), coverage and rejected int32
// (rejected -1 marks a pixel with more valid samples than D3_CLIP_MAX_FRAMES when a sort is needed).
// 1-D grid over channels * n_pixels.
extern "C" __global__ void d3_sigma_clip(const float* stack, const unsigned char* valid, int valid_channels,
                                         const float* weights, int weight_channels, const double* frame_weights,
                                         int has_frame_weights, int n_frames, int channels, int n_pixels,
                                         double sigma_lower, double sigma_upper, int maxiters, int median_centre,
                                         int mad_spread, float* mean, int* coverage, int* rejected) {
    const long long k = d3_global_x();
    if (k >= (long long)channels * n_pixels) return;
    const long long channel = k / n_pixels, pixel = k % n_pixels;
    d3_samples s;
    s.stack = stack + channel * n_pixels + pixel;
    s.frame_stride = (long long)channels * n_pixels;
    s.valid = valid_channels ? valid + (valid_channels > 1 ? channel : 0) * n_pixels + pixel : 0;
    s.valid_stride = (long long)valid_channels * n_pixels;
    s.weights = weight_channels ? weights + (weight_channels > 1 ? channel : 0) * n_pixels + pixel : 0;
    s.weight_stride = (long long)weight_channels * n_pixels;
    s.frame_weights = has_frame_weights ? frame_weights : 0;
    s.n_frames = n_frames;

    const double inf = d3_inf();
    double centre_mean = 0.0, std = 0.0;
    const int n_valid = d3_moments(s, -inf, inf, &centre_mean, &std);
    coverage[k] = n_valid;
    if (n_valid == 0) {
        mean[k] = d3_nanf();
        rejected[k] = 0;
        return;
    }
    const bool sorted_stats = median_centre || mad_spread;
    float sorted[D3_CLIP_MAX_FRAMES];
    if (sorted_stats) {
        if (n_valid > D3_CLIP_MAX_FRAMES) {
            mean[k] = d3_nanf();
            rejected[k] = -1;
            return;
        }
        int n = 0;
        for (int f = 0; f < n_frames; ++f) {
            const float x = s.stack[f * s.frame_stride];
            if (d3_sample_valid(s, f, x)) sorted[n++] = x;
        }
        d3_sort(sorted, n);
    }
    // The kept set is the range [a, b) of the sorted samples when sorted; otherwise valid ∩ [kept_lo, kept_hi],
    // the intersection of all bounds so far. Later moments: two-pass over the kept set (sorted order when
    // sorted, frame order otherwise).
    double kept_lo = -inf, kept_hi = inf, lo = 0.0, hi = 0.0;
    int count = n_valid, a = 0, b = n_valid;
    for (int iteration = 1;; ++iteration) {
        const double median = sorted_stats ? d3_median(sorted, a, b) : 0.0;
        const double centre = median_centre ? median : centre_mean;
        const double spread = mad_spread ? d3_mad_std(sorted, a, b, median) : std;
        lo = centre - sigma_lower * spread;
        hi = centre + sigma_upper * spread;
        kept_lo = fmax(kept_lo, lo);
        kept_hi = fmin(kept_hi, hi);
        int next;
        if (sorted_stats) {
            while (a < b && sorted[a] < lo) ++a;
            while (a < b && sorted[b - 1] > hi) --b;
            next = b - a;
            if (next != count && next > 0 && (!median_centre || !mad_spread))
                d3_range_moments(sorted, a, b, &centre_mean, &std);
        } else {
            next = d3_moments(s, kept_lo, kept_hi, &centre_mean, &std);
        }
        if (next == count || next == 0 || (maxiters > 0 && iteration >= maxiters)) break;
        count = next;
    }
    // The last bounds decide over all valid samples.
    const bool weighted = weight_channels || has_frame_weights;
    int n_kept = 0;
    double num = 0.0, den = 0.0;
    for (int f = 0; f < n_frames; ++f) {
        const float x = s.stack[f * s.frame_stride];
        if (!(d3_sample_valid(s, f, x) && x >= lo && x <= hi)) continue;
        ++n_kept;
        if (weighted) {
            double w = s.weights ? (double)s.weights[f * s.weight_stride] : 1.0;
            if (s.frame_weights) w = w * s.frame_weights[f];
            den += w;
            num += w * x;
        } else {
            num += x;
        }
    }
    if (!weighted) den = n_kept;
    mean[k] = den > 0.0 ? (float)(num / den) : d3_nanf();
    rejected[k] = n_valid - n_kept;
}
