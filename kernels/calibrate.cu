// Dark calibration of a raw window: repair of the hot pixels. Reference: dwarf3gpu/calibrate.py
// (calibrate_window, after the dark offset is subtracted); the same values bit for bit.
//
// A hot pixel becomes the median of its 8 same-colour neighbours (2 pixels away) that lie inside the window
// and are not hot themselves (the median of an even count is the mean of the two middle values, in float32);
// one without such a neighbour keeps its value. A uint16 window receives the median rounded half to even.
// One thread per hot pixel of the frame's sorted list, from index `first` for `count` entries (the host finds
// the range of the window's rows by binary search); entries outside the window's columns do nothing. Threads
// read only pixels that are not hot and write only their own hot pixel, so the order does not matter.
#include "common.cuh"

// Median of the usable neighbours of window pixel (r, c); false when there is none.
template <typename T>
D3_DEVICE bool d3_hot_median(const T* window, int h, int w, int row0, int col0, const unsigned char* hot,
                             int frame_w, int r, int c, float* median) {
    float values[8];
    int n = 0;
    for (int dr = -2; dr <= 2; dr += 2) {
        for (int dc = -2; dc <= 2; dc += 2) {
            const int rr = r + dr, cc = c + dc;
            if ((dr == 0 && dc == 0) || rr < 0 || rr >= h || cc < 0 || cc >= w) continue;
            if (hot[(long long)(row0 + rr) * frame_w + (col0 + cc)]) continue;
            float v = (float)window[(long long)rr * w + cc];
            int m = n++;
            while (m > 0 && values[m - 1] > v) {  // insertion sort
                values[m] = values[m - 1];
                --m;
            }
            values[m] = v;
        }
    }
    if (n == 0) return false;
    const float low = values[(n - 1) / 2], high = values[n / 2];
    *median = (low + high) / 2.0f;
    return true;
}

// Thread t of a repair launch: the hot pixel first + t of the frame's list, when it lies in the window.
template <typename T>
D3_DEVICE void d3_repair_one(T* window, int h, int w, int row0, int col0, const unsigned char* hot, int frame_w,
                             const int* hot_rows, const int* hot_cols, int first, int count, bool round) {
    const long long t = d3_global_x();
    if (t >= count) return;
    const int r = hot_rows[first + t] - row0, c = hot_cols[first + t] - col0;
    if (r < 0 || r >= h || c < 0 || c >= w) return;
    float median;
    if (d3_hot_median(window, h, w, row0, col0, hot, frame_w, r, c, &median))
        window[(long long)r * w + c] = (T)(round ? rintf(median) : median);
}

extern "C" __global__ void d3_repair_hot(float* window, int h, int w, int row0, int col0,
                                         const unsigned char* hot, int frame_w, const int* hot_rows,
                                         const int* hot_cols, int first, int count) {
    d3_repair_one(window, h, w, row0, col0, hot, frame_w, hot_rows, hot_cols, first, count, false);
}

extern "C" __global__ void d3_repair_hot_u16(unsigned short* window, int h, int w, int row0, int col0,
                                             const unsigned char* hot, int frame_w, const int* hot_rows,
                                             const int* hot_cols, int first, int count) {
    d3_repair_one(window, h, w, row0, col0, hot, frame_w, hot_rows, hot_cols, first, count, true);
}
