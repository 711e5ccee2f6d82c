// Decode of 16-bit FITS data (BITPIX = 16, BZERO = 32768, BSCALE = 1) to float32, with an optional
// fused dark subtraction and flat division. Reference: dwarf3gpu/fitsio.py (read_fits fast path).
#include "common.cuh"

// One thread per pixel i < n: the stored big-endian word (bytes[2 i], bytes[2 i + 1]) is the int16 value
// s, the pixel is s + 32768, i.e. the uint16 word with its top bit flipped, exact in float32. Then
// out = (value - dark[i]) / flat[i], each step in float32, skipped when has_dark / has_flat is 0 (the
// array is then not read).
extern "C" __global__ void d3_decode_bzero16(const unsigned char* bytes, int n, const float* dark, int has_dark,
                                             const float* flat, int has_flat, float* out) {
    const long long i = d3_global_x();
    if (i >= n) return;
    const unsigned int word = ((unsigned int)bytes[2 * i] << 8) | (unsigned int)bytes[2 * i + 1];
    float value = (float)(word ^ 0x8000u);
    if (has_dark) value = value - dark[i];
    if (has_flat) value = value / flat[i];
    out[i] = value;
}
