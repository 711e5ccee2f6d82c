// Affine resampling onto the reference grid: bilinear or bicubic (Keys, a = -0.5), a validity mask and a
// feather weight; the same per Bayer plane; and a raw mosaic straight to RGB, each colour from its own CFA
// lattice with Lanczos weights (red and blue optionally as colour differences from green). Reference:
// dwarf3gpu/warp.py (warp_affine, warp_bayer_planes, warp_lattice, warp_lattice_chroma).
// The source coordinate of every output pixel is computed in float64 from its ABSOLUTE reference position with
// the INVERSE affine B (frame <- reference), in the reference's order:
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

// ------------------------------------------------------------------------------------------ lattice warp
// Reference: dwarf3gpu/warp.py (warp_lattice, lattice_layout, lattice_planes, lanczos_table, _quantise,
// _lattice_sum). Each colour is resampled from its own CFA lattice with Lanczos weights read from host-computed
// tables (no sin on the device): R and B on their 2-pixel lattices (D3_LATTICE_RB_LOBES), G on the quincunx in
// rotated coordinates (D3_LATTICE_G_LOBES). The mosaic band is first split into three dense planes
// (d3_lattice_planes) so that the taps along each lattice's inner axis are contiguous in memory: the CPU build
// then sums them in SIMD lanes, the GPU reads them in fewer cache lines.

#define D3_LANCZOS_PHASE_BITS 10
#define D3_LANCZOS_PHASES (1 << D3_LANCZOS_PHASE_BITS)
#define D3_LATTICE_G_LOBES 5
#define D3_LATTICE_RB_LOBES 3

// Where the lattices of a band (band_h x band_w at (src_row0, src_col0), Bayer `pattern`) lie in their planes
// (warp.lattice_layout). Plane s (0 red, 1 blue) row i, column j is band pixel (row_off[s] + 2 i,
// col_off[s] + 2 j), lattice point (iy0[s] + i, jx0[s] + j). The green plane is n_u x n_v: row a, column b is
// lattice point (U, V) = (u_lo + a, v_lo + b), pixel (U + V + g, U - V) of the frame (0 where outside the band).
struct d3_lattice_layout {
    int site_r[2], site_c[2];
    int row_off[2], col_off[2], rows[2], cols[2];
    long long iy0[2], jx0[2];
    int g;
    long long u_lo, v_lo;
    int n_u, n_v;
};

D3_DEVICE d3_lattice_layout d3_make_lattice_layout(int band_h, int band_w, int src_row0, int src_col0, int pattern) {
    d3_lattice_layout L;
    const int red_r = pattern >> 1, red_c = pattern & 1;
    L.site_r[0] = red_r;
    L.site_c[0] = red_c;
    L.site_r[1] = 1 - red_r;
    L.site_c[1] = 1 - red_c;
    for (int s = 0; s < 2; ++s) {
        L.row_off[s] = (L.site_r[s] - src_row0) & 1;
        L.col_off[s] = (L.site_c[s] - src_col0) & 1;
        L.rows[s] = band_h > L.row_off[s] ? (band_h - L.row_off[s] + 1) / 2 : 0;
        L.cols[s] = band_w > L.col_off[s] ? (band_w - L.col_off[s] + 1) / 2 : 0;
        L.iy0[s] = ((long long)src_row0 + L.row_off[s] - L.site_r[s]) / 2;
        L.jx0[s] = ((long long)src_col0 + L.col_off[s] - L.site_c[s]) / 2;
    }
    L.g = (red_r + red_c + 1) & 1;
    const long long x0 = src_col0, y0 = src_row0, x1 = x0 + band_w - 1, y1 = y0 + band_h - 1;
    L.u_lo = (x0 + y0 - L.g) >> 1;  // arithmetic shift: floor division by 2
    L.v_lo = (x0 - y1 - L.g) >> 1;
    L.n_u = (int)(((x1 + y1 - L.g) >> 1) - L.u_lo + 1);
    L.n_v = (int)(((x1 - y0 - L.g) >> 1) - L.v_lo + 1);
    return L;
}

// Colour-difference planes (warp.lattice_chroma_planes): frame index k reflected about the edge pixels into
// [0, n - 1] (the Bayer colour is kept), then the mosaic value there, clamped to the band (such entries are never
// used by a valid pixel: the warp's band check covers D3_CHROMA_REACH).
#define D3_CHROMA_REACH 2

D3_DEVICE long long d3_reflect(long long k, int n) {
    k = k < 0 ? -k : k;
    return k > n - 1 ? 2LL * (n - 1) - k : k;
}

template <class T>
D3_DEVICE float d3_chroma_neighbour(const T* mosaic, int band_h, int band_w, int src_row0, int src_col0, int frame_h,
                                    int frame_w, long long Y, long long X) {
    const long long i = d3_clamp_index(d3_reflect(Y, frame_h) - src_row0, band_h);
    const long long j = d3_clamp_index(d3_reflect(X, frame_w) - src_col0, band_w);
    return (float)mosaic[i * band_w + j];
}

// Split a mosaic band into its red, blue and green lattice planes (layout above; the caller zeroes `green`
// first): the value of band pixel (x, y), converted to float32, goes to its colour's plane. With `chroma`
// (warp.lattice_chroma_planes) the red and blue planes hold C - G instead: G the Malvar-He-Cutler green estimate
// at the site from its 5 x 5 cross, G = ((N + S) + (W + E)) 0.25 + (((C + C) + (C + C)) - ((NN + SS) + (WW + EE)))
// 0.125, float32 in this order (exact on uniform colours; frame_h, frame_w are only read with `chroma`).
template <class T>
D3_DEVICE void d3_lattice_split(const T* mosaic, int band_h, int band_w, int src_row0, int src_col0, int frame_h,
                                int frame_w, int pattern, bool chroma, float* red, float* blue, float* green) {
    const long long x = d3_global_x(), y = d3_global_y();
    if (y >= band_h || x >= band_w) return;
    const d3_lattice_layout L = d3_make_lattice_layout(band_h, band_w, src_row0, src_col0, pattern);
    const float value = (float)mosaic[y * band_w + x];
    const long long X = src_col0 + x, Y = src_row0 + y;
    for (int s = 0; s < 2; ++s) {
        if ((int)(Y & 1) == L.site_r[s] && (int)(X & 1) == L.site_c[s]) {
            float sample = value;
            if (chroma) {
#define D3_AT(dy, dx) d3_chroma_neighbour(mosaic, band_h, band_w, src_row0, src_col0, frame_h, frame_w, Y + (dy), X + (dx))
                const float green4 = (D3_AT(-1, 0) + D3_AT(1, 0)) + (D3_AT(0, -1) + D3_AT(0, 1));
                const float far4 = (D3_AT(-2, 0) + D3_AT(2, 0)) + (D3_AT(0, -2) + D3_AT(0, 2));
#undef D3_AT
                const float laplace = ((value + value) + (value + value)) - far4;
                const float estimate = green4 * 0.25f + laplace * 0.125f;
                sample = value - estimate;
            }
            float* plane = s == 0 ? red : blue;
            plane[((y - L.row_off[s]) >> 1) * L.cols[s] + ((x - L.col_off[s]) >> 1)] = sample;
            return;
        }
    }
    const long long a = ((X + Y - L.g) >> 1) - L.u_lo, b = ((X - Y - L.g) >> 1) - L.v_lo;
    green[a * L.n_v + b] = value;
}

// d3_lattice_split of a float32 band. 2-D grid over the band, one thread per band pixel.
extern "C" __global__ void d3_lattice_planes(const float* mosaic, int band_h, int band_w, int src_row0, int src_col0,
                                             int pattern, float* red, float* blue, float* green) {
    d3_lattice_split(mosaic, band_h, band_w, src_row0, src_col0, 0, 0, pattern, false, red, blue, green);
}

// d3_lattice_split of a raw uint16 band (values exact in float32): no float32 copy of the band first.
extern "C" __global__ void d3_lattice_planes_u16(const unsigned short* mosaic, int band_h, int band_w, int src_row0,
                                                 int src_col0, int pattern, float* red, float* blue, float* green) {
    d3_lattice_split(mosaic, band_h, band_w, src_row0, src_col0, 0, 0, pattern, false, red, blue, green);
}

// Lattice coordinate rounded to 1 / D3_LANCZOS_PHASES: q = floor(coord P + 0.5), base = floor(q / P), phase.
D3_DEVICE void d3_quantise(double coord, long long* base, int* phase) {
    const long long q = (long long)floor(coord * (double)D3_LANCZOS_PHASES + 0.5);
    *base = q >> D3_LANCZOS_PHASE_BITS;  // arithmetic shift: floor division
    *phase = (int)(q & (D3_LANCZOS_PHASES - 1));
}

// Separable sum over the N x N taps plane[first + k outer + m] (k outer tap, m inner tap, inner taps contiguous),
// written relative to the centre tap c = N / 2 - 1 so that a uniform input comes out exactly: first along the
// outer axis for every m, acc[m] = x[c][m] + sum over k != c of w_outer[k] (x[k][m] - x[c][m]) (k in order), then
// along the inner axis, acc[c] + sum over m != c of w_inner[m] (acc[m] - acc[c]) (m in order); float32, no fused
// multiply-add (warp._lattice_sum). The m lanes are independent: the CPU build runs them in SIMD lanes.
template <int N>
D3_DEVICE float d3_lattice_sum(const float* plane, long long first, long long outer, const float* w_inner,
                               const float* w_outer) {
    const int c = N / 2 - 1;
    const float* centre = plane + first + c * outer;
    float acc[N];
    D3_SIMD for (int m = 0; m < N; ++m) acc[m] = centre[m];
    for (int k = 0; k < N; ++k) {
        if (k == c) continue;
        const float* row = plane + first + k * outer;
        const float w = w_outer[k];
        D3_SIMD for (int m = 0; m < N; ++m) acc[m] = acc[m] + w * (row[m] - centre[m]);
    }
    float value = acc[c];
    for (int m = 0; m < N; ++m) {
        if (m != c) value = value + w_inner[m] * (acc[m] - acc[c]);
    }
    return value;
}

// d3_lattice_split with `chroma`, of a float32 band. 2-D grid over the band, one thread per band pixel.
extern "C" __global__ void d3_lattice_chroma_planes(const float* mosaic, int band_h, int band_w, int src_row0,
                                                    int src_col0, int frame_h, int frame_w, int pattern, float* red,
                                                    float* blue, float* green) {
    d3_lattice_split(mosaic, band_h, band_w, src_row0, src_col0, frame_h, frame_w, pattern, true, red, blue, green);
}

// d3_lattice_split with `chroma`, of a raw uint16 band.
extern "C" __global__ void d3_lattice_chroma_planes_u16(const unsigned short* mosaic, int band_h, int band_w,
                                                        int src_row0, int src_col0, int frame_h, int frame_w,
                                                        int pattern, float* red, float* blue, float* green) {
    d3_lattice_split(mosaic, band_h, band_w, src_row0, src_col0, frame_h, frame_w, pattern, true, red, blue, green);
}

// One output pixel of d3_warp_lattice (chroma false) or d3_warp_lattice_chroma (true: the red and blue planes hold
// colour differences, their taps' D3_CHROMA_REACH neighbours must lie in the band, and R = G + (R - G)').
D3_DEVICE void d3_lattice_pixel(const float* red, const float* blue, const float* green, int band_h, int band_w,
                                int src_row0, int src_col0, int frame_h, int frame_w, int pattern,
                                const double* inverse, const float* table_rb, const float* table_g, int out_h,
                                int out_w, int out_row0, int out_col0, double feather_px, float* out,
                                unsigned char* valid, float* weight, bool chroma) {
    const long long j = d3_global_x(), i = d3_global_y();
    if (i >= out_h || j >= out_w) return;
    const long long plane = (long long)out_h * out_w, k = i * out_w + j;
    const double X = (double)(out_col0 + j), Y = (double)(out_row0 + i);
    const double xs = inverse[0] * X + (inverse[1] * Y + inverse[2]);
    const double ys = inverse[3] * X + (inverse[4] * Y + inverse[5]);
    const d3_lattice_layout L = d3_make_lattice_layout(band_h, band_w, src_row0, src_col0, pattern);
    const int nrb = D3_LATTICE_RB_LOBES, ng = D3_LATTICE_G_LOBES, g = L.g;

    bool ok = true;
    long long jx[2], iy[2];
    int px[2], py[2];
    long long lo_x = 0, hi_x = 0, lo_y = 0, hi_y = 0;
    for (int s = 0; s < 2; ++s) {
        const int r = L.site_r[s], c = L.site_c[s];
        d3_quantise((xs - (double)c) * 0.5, &jx[s], &px[s]);
        d3_quantise((ys - (double)r) * 0.5, &iy[s], &py[s]);
        ok = ok && jx[s] >= nrb - 1 && jx[s] + nrb <= (frame_w - c + 1) / 2 - 1;
        ok = ok && iy[s] >= nrb - 1 && iy[s] + nrb <= (frame_h - r + 1) / 2 - 1;
    }
    long long u0, v0;
    int pu, pv;
    d3_quantise(((xs + ys) - (double)g) * 0.5, &u0, &pu);
    d3_quantise(((xs - ys) - (double)g) * 0.5, &v0, &pv);
    const long long reach = 2 * (ng - 1);
    ok = ok && u0 + v0 - reach + g >= 0 && u0 + v0 + 2 * ng + g <= frame_w - 1;
    ok = ok && u0 - v0 - (2 * ng - 1) >= 0 && u0 - v0 + (2 * ng - 1) <= frame_h - 1;
    if (ok) {
        lo_x = u0 + v0 - reach + g;
        hi_x = u0 + v0 + 2 * ng + g;
        lo_y = u0 - v0 - (2 * ng - 1);
        hi_y = u0 - v0 + (2 * ng - 1);
        const int extra = chroma ? D3_CHROMA_REACH : 0;  // the green estimates' neighbours, reflected into the frame
        for (int s = 0; s < 2; ++s) {
            long long x0 = 2 * (jx[s] - (nrb - 1)) + L.site_c[s] - extra, x1 = 2 * (jx[s] + nrb) + L.site_c[s] + extra;
            long long y0 = 2 * (iy[s] - (nrb - 1)) + L.site_r[s] - extra, y1 = 2 * (iy[s] + nrb) + L.site_r[s] + extra;
            x0 = x0 < 0 ? 0 : x0;
            y0 = y0 < 0 ? 0 : y0;
            x1 = x1 > frame_w - 1 ? frame_w - 1 : x1;
            y1 = y1 > frame_h - 1 ? frame_h - 1 : y1;
            lo_x = x0 < lo_x ? x0 : lo_x;
            hi_x = x1 > hi_x ? x1 : hi_x;
            lo_y = y0 < lo_y ? y0 : lo_y;
            hi_y = y1 > hi_y ? y1 : hi_y;
        }
    }
    const bool in_band = lo_x >= src_col0 && hi_x <= src_col0 + (long long)band_w - 1 && lo_y >= src_row0 &&
                         hi_y <= src_row0 + (long long)band_h - 1;
    if (!ok || !in_band) {
        out[k] = 0.0f;
        out[plane + k] = 0.0f;
        out[2 * plane + k] = 0.0f;
        valid[k] = ok ? 2 : 0;
        weight[k] = 0.0f;
        return;
    }
    // G: inner axis v, outer axis u; first tap (U0 - n + 1, V0 - n + 1).
    const long long first_g = (u0 - (ng - 1) - L.u_lo) * L.n_v + (v0 - (ng - 1) - L.v_lo);
    const float value_g = d3_lattice_sum<2 * D3_LATTICE_G_LOBES>(
        green, first_g, L.n_v, table_g + (long long)pv * (2 * ng), table_g + (long long)pu * (2 * ng));
    out[plane + k] = value_g;
    for (int s = 0; s < 2; ++s) {
        const long long first = (iy[s] - (nrb - 1) - L.iy0[s]) * L.cols[s] + (jx[s] - (nrb - 1) - L.jx0[s]);
        const float value = d3_lattice_sum<2 * D3_LATTICE_RB_LOBES>(
            s == 0 ? red : blue, first, L.cols[s], table_rb + (long long)px[s] * (2 * nrb),
            table_rb + (long long)py[s] * (2 * nrb));
        out[(s == 0 ? 0 : 2) * plane + k] = chroma ? value_g + value : value;
    }
    valid[k] = 1;
    if (feather_px > 0.0) {
        const double ex = fmin(xs + 0.5, (frame_w - 0.5) - xs);
        const double ey = fmin(ys + 0.5, (frame_h - 0.5) - ys);
        const double taper = fmin(ex, ey) / feather_px;
        weight[k] = (float)(taper < 0.0 ? 0.0 : (taper > 1.0 ? 1.0 : taper));
    } else {
        weight[k] = 1.0f;
    }
}

// Resample the lattice planes of a raw mosaic band (band_h x band_w at (src_row0, src_col0) of a frame_h x
// frame_w frame with Bayer pattern `pattern`, split by d3_lattice_planes) to RGB on an out_h x out_w reference
// tile at (out_row0, out_col0). `inverse` is B = A^-1 (6 doubles); table_rb / table_g are the Lanczos tables
// (D3_LANCZOS_PHASES rows of 2 lobes floats). 2-D grid, one thread per output pixel; out (3, out_h, out_w),
// valid and weight (out_h, out_w). valid: 0 invalid, 1 valid, 2 valid but a tap lies outside the band (the
// Python wrapper raises).
extern "C" __global__ void d3_warp_lattice(const float* red, const float* blue, const float* green, int band_h,
                                           int band_w, int src_row0, int src_col0, int frame_h, int frame_w,
                                           int pattern, const double* inverse, const float* table_rb,
                                           const float* table_g, int out_h, int out_w, int out_row0, int out_col0,
                                           double feather_px, float* out, unsigned char* valid, float* weight) {
    d3_lattice_pixel(red, blue, green, band_h, band_w, src_row0, src_col0, frame_h, frame_w, pattern, inverse, table_rb,
                     table_g, out_h, out_w, out_row0, out_col0, feather_px, out, valid, weight, false);
}

// d3_warp_lattice on the planes of d3_lattice_chroma_planes (warp.warp_lattice_chroma): R = G' + (R - G)',
// B = G' + (B - G)', same arguments, valid mask and weight.
extern "C" __global__ void d3_warp_lattice_chroma(const float* red, const float* blue, const float* green, int band_h,
                                                  int band_w, int src_row0, int src_col0, int frame_h, int frame_w,
                                                  int pattern, const double* inverse, const float* table_rb,
                                                  const float* table_g, int out_h, int out_w, int out_row0,
                                                  int out_col0, double feather_px, float* out, unsigned char* valid,
                                                  float* weight) {
    d3_lattice_pixel(red, blue, green, band_h, band_w, src_row0, src_col0, frame_h, frame_w, pattern, inverse, table_rb,
                     table_g, out_h, out_w, out_row0, out_col0, feather_px, out, valid, weight, true);
}
