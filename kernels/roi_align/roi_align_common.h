// Shared by the CPU (.cpp) and CUDA (.cu) RoIAlign kernels.
//
// RoIAlign (torchvision semantics) samples a grid_h x grid_w lattice of points in every output
// bin, reads each point by bilinear interpolation and averages. A sample (iy, ix) is dropped when
// its y OR its x lies outside [-1, size]; otherwise its four bilinear weights are products
// wy(iy, y) * wx(ix, x). Both the validity test and the weights factor over the two axes, so the
// whole bin is an outer product of two 1-D "profiles":
//
//   out[k, c, ph, pw] = norm_k * sum_y sum_x Py[k, ph, y] * Px[k, pw, x] * in[b_k, c, y, x]
//
// with Py[k, ph, y] = sum over valid y-samples iy of bin ph of their bilinear weight on row y
// (same for Px) and norm_k = 1 / (grid_h * grid_w). A profile row is non-zero only on a short
// contiguous range (the bin plus one pixel), which we record as [lo, hi). This turns the
// grid_h * grid_w * 4 reads per bin of the textbook kernel into one pass over the bin's pixels,
// and the backward becomes a plain gather (each input pixel sums Py * Px * grad over the boxes
// of its image) with a fixed summation order: deterministic without atomics.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FGCLIP_HD __host__ __device__ __forceinline__
#else
#define FGCLIP_HD inline
#endif

namespace fgclip::roi_align {

// Largest per-axis sample count; the kernels count samples per axis in int32 and per bin in
// int64 (grid_h * grid_w can exceed 2^31).
constexpr double kMaxGrid = 2147483647.0;

// Sampling geometry of one box along one axis.
template <typename acc_t>
struct Axis {
  acc_t start;  // first bin edge, in feature-map pixels
  acc_t bin;    // bin size (negative for inverted boxes with aligned=True, as in torchvision)
  int grid;     // samples per bin along this axis; <= 0 means no samples at all
  bool valid;   // false when the adaptive sample count is NaN or beyond kMaxGrid
};

template <typename acc_t>
FGCLIP_HD bool is_finite(acc_t v) {
  return v - v == acc_t(0);  // false for NaN and +-inf (no <cmath> overloads needed on device)
}

// Mirrors torchvision's arithmetic (same types, same evaluation order) so sample positions are
// bit-identical to torchvision's and fp32 parity holds to rounding of the final sums.
template <typename acc_t>
FGCLIP_HD Axis<acc_t> make_axis(acc_t lo, acc_t hi, acc_t scale, bool aligned, int pooled,
                                int sampling_ratio) {
  const acc_t offset = aligned ? acc_t(0.5) : acc_t(0);
  Axis<acc_t> a;
  a.start = lo * scale - offset;
  const acc_t end = hi * scale - offset;
  acc_t size = end - a.start;
  // Legacy (aligned=False) mode forces boxes to be at least one pixel wide.
  if (!aligned && size < acc_t(1)) size = acc_t(1);
  a.bin = size / static_cast<acc_t>(pooled);
  a.valid = true;
  if (sampling_ratio > 0) {
    a.grid = sampling_ratio;
  } else {
    // ceil of a float is exact in double; the division stays in acc_t as in torchvision. A NaN
    // or huge count would be undefined as an int (torchvision indexes memory with it).
    const double g = ::ceil(double(a.bin));
    a.valid = g <= kMaxGrid;  // false for NaN and +inf
    a.grid = !a.valid || g <= 0.0 ? 0 : static_cast<int>(g);
  }
  return a;
}

// Accumulates bin p's profile into w[0, len) (caller zeroes it) and returns its support as
// [range[0], range[1]); an empty support is [0, 0).
template <typename acc_t>
FGCLIP_HD void axis_profile(const Axis<acc_t>& a, int p, int len, acc_t* w, int* range) {
  int lo_min = len, hi_max = -1;
  for (int i = 0; i < a.grid; ++i) {
    acc_t c = a.start + p * a.bin +
              static_cast<acc_t>(i + .5f) * a.bin / static_cast<acc_t>(a.grid);
    // Sample outside the map, or NaN (written so that NaN fails the test and is skipped).
    if (!(c >= acc_t(-1) && c <= static_cast<acc_t>(len))) continue;
    if (c <= acc_t(0)) c = acc_t(0);
    int lo = static_cast<int>(c);
    int hi;
    acc_t frac;
    if (lo >= len - 1) {
      lo = hi = len - 1;
      frac = acc_t(0);
    } else {
      hi = lo + 1;
      frac = c - static_cast<acc_t>(lo);
    }
    w[lo] += acc_t(1) - frac;
    w[hi] += frac;
    lo_min = lo < lo_min ? lo : lo_min;
    hi_max = hi > hi_max ? hi : hi_max;
  }
  if (hi_max < 0) {
    range[0] = range[1] = 0;
  } else {
    range[0] = lo_min;
    range[1] = hi_max + 1;
  }
}

// Per-box normaliser 1 / (grid_h * grid_w); zero when either axis has no samples (the box then
// pools to 0, as in torchvision where the empty sum is divided by max(count, 1)). The count is
// an int64 product: 46341 x 46341 samples already overflow int32.
template <typename acc_t>
FGCLIP_HD acc_t box_norm(const Axis<acc_t>& ay, const Axis<acc_t>& ax) {
  if (ay.grid <= 0 || ax.grid <= 0) return acc_t(0);
  return acc_t(1) / static_cast<acc_t>(static_cast<long long>(ay.grid) * ax.grid);
}

// Image index of a box for the kernels' meta column: its batch index if valid, kBadIndex when
// out of [0, n_img) (truncated toward zero, as torchvision's int cast), kBadBox when a value is
// not finite or the adaptive sample count is unrepresentable. Both negatives pool to zero; the
// CPU op raises for them, the CUDA op cannot without a host sync.
constexpr int kBadIndex = -1;
constexpr int kBadBox = -2;

template <typename acc_t>
FGCLIP_HD int box_image(const acc_t* box, int64_t n_img, const Axis<acc_t>& ay,
                        const Axis<acc_t>& ax) {
  for (int i = 0; i < 5; ++i)
    if (!is_finite(box[i])) return kBadBox;
  if (!ay.valid || !ax.valid) return kBadBox;
  const acc_t b = box[0];
  if (!(b > acc_t(-1) && b < static_cast<acc_t>(n_img))) return kBadIndex;
  return static_cast<int>(b);
}

}  // namespace fgclip::roi_align
