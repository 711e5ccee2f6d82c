// Affine resampling onto the reference grid: bilinear or bicubic (Keys, a = -0.5), a validity mask and a
// feather weight; and the same per Bayer plane. Reference: dwarf3gpu/warp.py (warp_affine,
// warp_bayer_planes). The source coordinate of every output pixel is computed in float64 from its
// ABSOLUTE reference position with the INVERSE affine B (frame <- reference), in the reference's order:
//   xs = B00 X + (B01 Y + B02),  ys = B10 X + (B11 Y + B12),
// and the interpolation repeats the reference's float32 operations, so the results are bit-identical.
//
// Valid-mask values: 0 = no valid sample, 1 = valid, 2 = valid but a tap with a non-zero weight lies outside
// the given source band (the caller cut the band too small: the value is not computed and the Python
// wrapper raises, like warp.py's band check).
#include "common.cuh"

#define D3_KEYS_A (-0.5)

// A source band: channel c, band pixel (i, j) is data[c * channel_stride + i * row_stride + j * col_stride].
struct d3_band {
    const float* data;
    long long channel_stride, row_stride, col_stride;
    int channels;
    int h, w;              // band size
    int row0, col0;        // band pixel (0, 0) in the full source frame
    int frame_h, frame_w;  // full source frame size
};

// Tap weights along one axis for the fractional offset t in [0, 1), float32 as in warp._weights.
// Bilinear: taps (0, 1), weight[1] = t. Bicubic: taps (-1, 0, 1, 2), weights at the distances
// (1 + t, -, 1 - t, 2 - t). The tap at floor (index `centre`) has an implicit weight.
D3_DEVICE void d3_tap_weights(double t, int method, float* weight) {
    if (method == D3_BILINEAR) {
        weight[1] = (float)t;
        return;
    }
    const double a = D3_KEYS_A;
    double d = 1.0 + t;
    weight[0] = (float)(((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a);
    d = 2.0 - t;
    weight[3] = (float)(((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a);
    d = 1.0 - t;
    weight[2] = (float)(((a + 2.0) * d - (a + 3.0)) * d * d + 1.0);
}

// Clamp a band index to [0, n - 1] (taps of weight 0 beyond the frame edge).
D3_DEVICE long long d3_clamp_index(long long k, int n) { return k < 0 ? 0 : (k > n - 1 ? n - 1 : k); }

// Resample every channel of `src` at reference position (X, Y) through the inverse affine B (6 doubles,
// row-major 2x3) and write out[c * out_plane + k], valid[k] and weight[k].
D3_DEVICE void d3_warp_pixel(const d3_band& src, const double* B, double X, double Y, int method,
                             double feather_px, float* out, long long out_plane, long long k,
                             unsigned char* valid, float* weight) {
    const double xs = B[0] * X + (B[1] * Y + B[2]);
    const double ys = B[3] * X + (B[4] * Y + B[5]);
    const int first = method == D3_BICUBIC ? -1 : 0, last = method == D3_BICUBIC ? 2 : 1;
    const int centre = -first, n_taps = last - first + 1;
    const bool ok = xs >= -first && xs <= src.frame_w - last && ys >= -first && ys <= src.frame_h - last;
    const double fx = ok ? floor(xs) : 0.0, fy = ok ? floor(ys) : 0.0;
    const long long ix = (long long)fx, iy = (long long)fy;
    // Taps with a non-zero weight that lie in the frame must lie in the band.
    const long long tap_x0 = ix + first < 0 ? 0 : ix + first;
    const long long tap_x1 = ix + last > src.frame_w - 1 ? src.frame_w - 1 : ix + last;
    const long long tap_y0 = iy + first < 0 ? 0 : iy + first;
    const long long tap_y1 = iy + last > src.frame_h - 1 ? src.frame_h - 1 : iy + last;
    const bool in_band = tap_x0 >= src.col0 && tap_x1 <= src.col0 + (long long)src.w - 1 && tap_y0 >= src.row0 &&
                         tap_y1 <= src.row0 + (long long)src.h - 1;
    if (!ok || !in_band) {
        for (int c = 0; c < src.channels; ++c) out[c * out_plane + k] = 0.0f;
        valid[k] = ok ? 2 : 0;
        weight[k] = 0.0f;
        return;
    }
    float wx[4], wy[4];
    d3_tap_weights(xs - fx, method, wx);
    d3_tap_weights(ys - fy, method, wy);
    long long col[4], row[4];
    for (int m = 0; m < n_taps; ++m) {
        col[m] = d3_clamp_index(ix - src.col0 + first + m, src.w) * src.col_stride;
        row[m] = d3_clamp_index(iy - src.row0 + first + m, src.h) * src.row_stride;
    }
    for (int c = 0; c < src.channels; ++c) {
        const float* plane = src.data + c * src.channel_stride;
        // Along x per tap row, then along y, each step relative to the tap at floor (warp._interpolate).
        float line[4];
        for (int r = 0; r < n_taps; ++r) {
            const float at_centre = plane[row[r] + col[centre]];
            float value = at_centre;
            for (int m = 0; m < n_taps; ++m) {
                if (m == centre) continue;
                float term = plane[row[r] + col[m]] - at_centre;
                term = term * wx[m];
                value = value + term;
            }
            line[r] = value;
        }
        float value = line[centre];
        for (int r = 0; r < n_taps; ++r) {
            if (r == centre) continue;
            float term = line[r] - line[centre];
            term = term * wy[r];
            value = value + term;
        }
        out[c * out_plane + k] = value;
    }
    valid[k] = 1;
    if (feather_px > 0.0) {
        const double ex = fmin(xs + 0.5, (src.frame_w - 0.5) - xs);
        const double ey = fmin(ys + 0.5, (src.frame_h - 0.5) - ys);
        const double taper = fmin(ex, ey) / feather_px;
        weight[k] = (float)(taper < 0.0 ? 0.0 : (taper > 1.0 ? 1.0 : taper));
    } else {
        weight[k] = 1.0f;
    }
}

// Warp a (channels, band_h, band_w) source band into an out_h x out_w tile whose pixel (0, 0) is reference
// pixel (out_row0, out_col0). `inverse` holds B = A^-1 (6 doubles). 2-D grid, one thread per output pixel;
// out is (channels, out_h, out_w), valid and weight (out_h, out_w).
extern "C" __global__ void d3_warp_affine(const float* src, int channels, int band_h, int band_w, int src_row0,
                                          int src_col0, int frame_h, int frame_w, const double* inverse, int out_h,
                                          int out_w, int out_row0, int out_col0, int method, double feather_px,
                                          float* out, unsigned char* valid, float* weight) {
    const long long j = d3_global_x(), i = d3_global_y();
    if (i >= out_h || j >= out_w) return;
    d3_band band;
    band.data = src;
    band.channel_stride = (long long)band_h * band_w;
    band.row_stride = band_w;
    band.col_stride = 1;
    band.channels = channels;
    band.h = band_h;
    band.w = band_w;
    band.row0 = src_row0;
    band.col0 = src_col0;
    band.frame_h = frame_h;
    band.frame_w = frame_w;
    d3_warp_pixel(band, inverse, (double)(out_col0 + j), (double)(out_row0 + i), method, feather_px, out,
                  (long long)out_h * out_w, i * out_w + j, valid, weight);
}

// Warp a raw mosaic band as its four Bayer planes: output pixel at absolute reference (Y, X) has the site
// (r, c) = (Y & 1, X & 1) and is resampled from the plane of that site (mosaic pixels of absolute parity
// (r, c), plane pixel p = full-resolution 2 p + (c, r)) with the plane inverse affine
// plane_inverse[6 (2 r + c) ...] (see warp.plane_transform) and a feather of feather_px / 2 plane pixels.
// 2-D grid, one thread per output pixel; out, valid, weight are (out_h, out_w).
extern "C" __global__ void d3_warp_bayer_planes(const float* mosaic, int band_h, int band_w, int src_row0,
                                                int src_col0, int frame_h, int frame_w, const double* plane_inverse,
                                                int out_h, int out_w, int out_row0, int out_col0, int method,
                                                double feather_px, float* out, unsigned char* valid,
                                                float* weight) {
    const long long j = d3_global_x(), i = d3_global_y();
    if (i >= out_h || j >= out_w) return;
    const long long Y = out_row0 + i, X = out_col0 + j;
    const int r = (int)(Y & 1), c = (int)(X & 1);
    const int in_r = (r + src_row0) & 1, in_c = (c + src_col0) & 1;  // first band row/column of the site
    d3_band plane;
    plane.data = mosaic + (long long)in_r * band_w + in_c;
    plane.channel_stride = 0;
    plane.row_stride = 2LL * band_w;
    plane.col_stride = 2;
    plane.channels = 1;
    plane.h = band_h > in_r ? (band_h - in_r + 1) / 2 : 0;
    plane.w = band_w > in_c ? (band_w - in_c + 1) / 2 : 0;
    plane.row0 = (src_row0 + in_r - r) / 2;
    plane.col0 = (src_col0 + in_c - c) / 2;
    plane.frame_h = (frame_h - r + 1) / 2;
    plane.frame_w = (frame_w - c + 1) / 2;
    d3_warp_pixel(plane, plane_inverse + 6 * (2 * r + c), (double)((X - c) / 2), (double)((Y - r) / 2), method,
                  feather_px / 2.0, out, 0, i * out_w + j, valid, weight);
}
