// Debayering of a raw mosaic: bilinear by normalised convolution, 2x2 superpixel, and the half-resolution
// luminance proxy. References: dwarf3gpu/debayer.py (debayer_bilinear, debayer_superpixel) and
// dwarf3gpu/stars.py (luminance_proxy); each formula below repeats the reference's float32 operations in
// the same order, so the results are bit-identical.
#include "common.cuh"

// 1 where local index k of an axis of length n lies in the band and its absolute index origin + k has
// the given parity (a site row or column of one colour), else 0.
D3_DEVICE bool d3_on_site(long long k, int n, int origin, int parity) {
    return k >= 0 && k < n && ((origin + k) & 1) == parity;
}

// R or B with its site at (site_r, site_c) of the 2x2 cell: K = [1/2, 1, 1/2] outer itself over the
// zero-padded sparse plane of the colour's samples, rows smoothed first, then columns, then divided by the
// two 1-D normalisations a[k] + 0.5 (a[k - 1] + a[k + 1]) of the site indicators (1 or 1/2).
D3_DEVICE float d3_bilinear_rb(const float* mosaic, int h, int w, int row0, int col0, int site_r, int site_c,
                               long long i, long long j) {
    bool col_site[3], row_site[3];
    for (int m = 0; m < 3; ++m) {
        col_site[m] = d3_on_site(j - 1 + m, w, col0, site_c);
        row_site[m] = d3_on_site(i - 1 + m, h, row0, site_r);
    }
    float across[3];
    for (int k = 0; k < 3; ++k) {
        const long long at = (i - 1 + k) * w + j;
        const float left = row_site[k] && col_site[0] ? mosaic[at - 1] : 0.0f;
        const float right = row_site[k] && col_site[2] ? mosaic[at + 1] : 0.0f;
        const float centre = row_site[k] && col_site[1] ? mosaic[at] : 0.0f;
        across[k] = (left + right) * 0.5f + centre;
    }
    float value = (across[0] + across[2]) * 0.5f + across[1];
    const float rows = ((float)row_site[0] + (float)row_site[2]) * 0.5f + (float)row_site[1];
    const float cols = ((float)col_site[0] + (float)col_site[2]) * 0.5f + (float)col_site[1];
    value = value / rows;
    value = value / cols;
    return value;
}

// G: the cross [[0,1,0],[1,4,1],[0,1,0]] / 4 over the zero-padded sparse plane of the green samples (greens
// are the sites whose absolute row + col has the parity `green`), divided by 1 on a green site and by
// (n_v + n_h) / 4 elsewhere (the in-band vertical and horizontal neighbour counts).
D3_DEVICE float d3_bilinear_g(const float* mosaic, int h, int w, int row0, int col0, int green, long long i,
                              long long j) {
    const long long at = i * w + j;
    const bool on_green = ((row0 + i + col0 + j) & 1) == green;
    const float up = !on_green && i > 0 ? mosaic[at - w] : 0.0f;
    const float down = !on_green && i < h - 1 ? mosaic[at + w] : 0.0f;
    const float left = !on_green && j > 0 ? mosaic[at - 1] : 0.0f;
    const float right = !on_green && j < w - 1 ? mosaic[at + 1] : 0.0f;
    const float centre = on_green ? mosaic[at] : 0.0f;
    float value = (up + down) + (left + right);
    value = value * 0.25f;
    value = value + centre;
    if (on_green) return value / 1.0f;
    const float rows = (float)(i > 0) + (float)(i < h - 1);
    const float cols = (float)(j > 0) + (float)(j < w - 1);
    return value / (0.25f * (rows + cols));
}

// Bilinear debayer of an h x w band whose pixel (0, 0) is at absolute (row0, col0) of a frame with Bayer
// pattern `pattern`. 2-D grid, one thread per pixel (x = column, y = row); out is (3, h, w): R, G, B.
extern "C" __global__ void d3_debayer_bilinear(const float* mosaic, int h, int w, int row0, int col0, int pattern,
                                               float* out) {
    const long long j = d3_global_x(), i = d3_global_y();
    if (i >= h || j >= w) return;
    const int red_r = pattern >> 1, red_c = pattern & 1;
    const long long plane = (long long)h * w, k = i * w + j;
    out[k] = d3_bilinear_rb(mosaic, h, w, row0, col0, red_r, red_c, i, j);
    out[plane + k] = d3_bilinear_g(mosaic, h, w, row0, col0, (red_r + red_c + 1) & 1, i, j);
    out[2 * plane + k] = d3_bilinear_rb(mosaic, h, w, row0, col0, 1 - red_r, 1 - red_c, i, j);
}

// Superpixel debayer of an h x w mosaic whose pixel (0, 0) starts a Bayer cell: one thread per output
// pixel (i, j) of the (3, h / 2, w / 2) output, from mosaic rows 2i, 2i + 1 and columns 2j, 2j + 1:
// R, (G1 + G2) * 0.5, B.
extern "C" __global__ void d3_debayer_superpixel(const float* mosaic, int h, int w, int pattern, float* out) {
    const long long j = d3_global_x(), i = d3_global_y();
    const int oh = h / 2, ow = w / 2;
    if (i >= oh || j >= ow) return;
    const int red_r = pattern >> 1, red_c = pattern & 1;
    const float* cell = mosaic + 2 * i * w + 2 * j;
    const float red = cell[red_r * w + red_c];
    const float green = (cell[red_r * w + (1 - red_c)] + cell[(1 - red_r) * w + red_c]) * 0.5f;
    const float blue = cell[(1 - red_r) * w + (1 - red_c)];
    const long long plane = (long long)oh * ow, k = i * ow + j;
    out[k] = red;
    out[plane + k] = green;
    out[2 * plane + k] = blue;
}

// Luminance proxy (h / 2, w / 2): per 2x2 cell the mean of its two greens, (G1 + G2) * 0.5; for
// pattern D3_MONO the mean of its four pixels, (((p00 + p01) + p10) + p11) * 0.25.
extern "C" __global__ void d3_luminance_proxy(const float* mosaic, int h, int w, int pattern, float* out) {
    const long long j = d3_global_x(), i = d3_global_y();
    const int oh = h / 2, ow = w / 2;
    if (i >= oh || j >= ow) return;
    const float* cell = mosaic + 2 * i * w + 2 * j;
    float value;
    if (pattern == D3_MONO) {
        value = cell[0] + cell[1];
        value = value + cell[w];
        value = value + cell[w + 1];
        value = value * 0.25f;
    } else {
        const int red_r = pattern >> 1, red_c = pattern & 1;
        value = (cell[red_r * w + (1 - red_c)] + cell[(1 - red_r) * w + red_c]) * 0.5f;
    }
    out[i * ow + j] = value;
}
