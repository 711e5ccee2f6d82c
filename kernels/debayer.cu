// Debayering of a raw mosaic: bilinear by normalised convolution, Malvar-He-Cutler, 2x2 superpixel.
// Reference: dwarf3gpu/debayer.py (debayer_bilinear, debayer_mhc, debayer_superpixel); each formula below
// repeats the reference's float32 operations in the same order, so the results are bit-identical.
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

// Malvar-He-Cutler debayer of an h x w band whose pixel (0, 0) is at absolute (row0, col0): pixels at least 2
// from every band edge take the 5x5 MHC filters (all / 8; C the pixel, H1/V1 the horizontal/vertical
// neighbours at distance 1 summed, H2/V2 at distance 2, D the four diagonals), the others the bilinear
// debayer of the whole band. 2-D grid, one thread per pixel; out is (3, h, w): R, G, B.
extern "C" __global__ void d3_debayer_mhc(const float* mosaic, int h, int w, int row0, int col0, int pattern,
                                          float* out) {
    const long long j = d3_global_x(), i = d3_global_y();
    if (i >= h || j >= w) return;
    const long long plane = (long long)h * w, k = i * w + j;
    const int red_r = pattern >> 1, red_c = pattern & 1;
    if (i < 2 || i >= h - 2 || j < 2 || j >= w - 2) {
        out[k] = d3_bilinear_rb(mosaic, h, w, row0, col0, red_r, red_c, i, j);
        out[plane + k] = d3_bilinear_g(mosaic, h, w, row0, col0, (red_r + red_c + 1) & 1, i, j);
        out[2 * plane + k] = d3_bilinear_rb(mosaic, h, w, row0, col0, 1 - red_r, 1 - red_c, i, j);
        return;
    }
    const float* p = mosaic + k;
    const float centre = p[0];
    const float h1 = p[-1] + p[1];
    const float v1 = p[-w] + p[w];
    const float h2 = p[-2] + p[2];
    const float v2 = p[-2 * w] + p[2 * w];
    const float diag = (p[-w - 1] + p[-w + 1]) + (p[w - 1] + p[w + 1]);
    const int site = d3_bayer_colour(pattern, row0 + i, col0 + j);
    out[site * plane + k] = centre;
    if (site == D3_GREEN) {
        const int horiz = d3_bayer_colour(pattern, row0 + i, col0 + j + 1);  // colour left and right
        const float along = ((5.0f * centre + 4.0f * h1) - (h2 + diag) + 0.5f * v2) * 0.125f;
        const float across = ((5.0f * centre + 4.0f * v1) - (v2 + diag) + 0.5f * h2) * 0.125f;
        out[horiz * plane + k] = along;
        out[(horiz == D3_RED ? D3_BLUE : D3_RED) * plane + k] = across;
    } else {
        const float axial2 = h2 + v2;
        const float green = ((4.0f * centre + 2.0f * (h1 + v1)) - axial2) * 0.125f;
        const float opposite = ((6.0f * centre + 2.0f * diag) - 1.5f * axial2) * 0.125f;
        out[D3_GREEN * plane + k] = green;
        out[(site == D3_RED ? D3_BLUE : D3_RED) * plane + k] = opposite;
    }
}
