// fgclip::roi_align operator schema and CPU kernels (forward and deterministic backward).
//
// Forward: parallel over (box, channel); each output bin is one pass over its pixels using the
// separable profiles (roi_align_common.h).
// Backward: parallel over (image, channel) planes; each plane is owned by one thread, which
// accumulates the contributions of the boxes of its image in ascending box order into an fp32
// scratch plane. No atomics, and the summation order does not depend on the thread count, so
// gradients are bit-identical run to run. Cost: O(N*C*H*W) to clear and write the planes plus
// O(C * sum over boxes of the pixels under their bins), i.e. about one forward pass.
// Channels-last features use NHWC variants of both (work items are (box or image, block of 64
// channels), inner loops run over contiguous channels and vectorise); they perform the same
// floating-point operations per element in the same order as the NCHW kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "roi_align_common.h"
#include "roi_align_op.h"

namespace fgclip::roi_align {
namespace {

template <typename acc_t>
void compute_profiles_cpu(const at::Tensor& rois, double spatial_scale, int ph_n, int pw_n,
                          int64_t n_img, int h, int w, int sampling_ratio, bool aligned,
                          Profiles& p) {
  const int64_t k_n = rois.size(0);
  const acc_t* r = rois.data_ptr<acc_t>();  // (K, 5)
  acc_t* wy = p.wy.data_ptr<acc_t>();       // (K, PH, H)
  acc_t* wx = p.wx.data_ptr<acc_t>();       // (K, PW, W)
  int* ry = p.ry.data_ptr<int>();           // (K, PH, 2)
  int* rx = p.rx.data_ptr<int>();           // (K, PW, 2)
  int* meta = p.meta.data_ptr<int>();       // (K, 5)
  acc_t* norm = p.norm.data_ptr<acc_t>();   // (K,)
  const acc_t scale = static_cast<acc_t>(spatial_scale);
  at::parallel_for(0, k_n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* box = r + k * 5;
      const auto ay = make_axis<acc_t>(box[2], box[4], scale, aligned, ph_n, sampling_ratio);
      const auto ax = make_axis<acc_t>(box[1], box[3], scale, aligned, pw_n, sampling_ratio);
      meta[k * 5] = box_image(box, n_img, ay, ax);
      norm[k] = box_norm(ay, ax);
      int y0 = h, y1 = 0, x0 = w, x1 = 0;
      for (int ph = 0; ph < ph_n; ++ph) {
        int* rr = ry + (k * ph_n + ph) * 2;
        axis_profile(ay, ph, h, wy + (k * ph_n + ph) * h, rr);
        if (rr[1] > rr[0]) y0 = std::min(y0, rr[0]), y1 = std::max(y1, rr[1]);
      }
      for (int pw = 0; pw < pw_n; ++pw) {
        int* rr = rx + (k * pw_n + pw) * 2;
        axis_profile(ax, pw, w, wx + (k * pw_n + pw) * w, rr);
        if (rr[1] > rr[0]) x0 = std::min(x0, rr[0]), x1 = std::max(x1, rr[1]);
      }
      meta[k * 5 + 1] = y0, meta[k * 5 + 2] = y1, meta[k * 5 + 3] = x0, meta[k * 5 + 4] = x1;
    }
  });
}

template <typename scalar_t>
void forward_cpu(const at::Tensor& input, const Profiles& p, int ph_n, int pw_n, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c_n = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t k_n = out.size(0);
  const scalar_t* in = input.data_ptr<scalar_t>();  // (N, C, H, W)
  scalar_t* o = out.data_ptr<scalar_t>();           // (K, C, PH, PW)
  const acc_t* wy = p.wy.data_ptr<acc_t>();
  const acc_t* wx = p.wx.data_ptr<acc_t>();
  const int* ry = p.ry.data_ptr<int>();
  const int* rx = p.rx.data_ptr<int>();
  const int* meta = p.meta.data_ptr<int>();
  const acc_t* norm = p.norm.data_ptr<acc_t>();
  const int64_t bins = int64_t(ph_n) * pw_n;
  // Consecutive work items share a box, so its profiles stay in cache across channels.
  at::parallel_for(0, k_n * c_n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t kc = begin; kc < end; ++kc) {
      const int64_t k = kc / c_n, c = kc % c_n;
      scalar_t* ok = o + kc * bins;
      const int b = meta[k * 5];
      if (b < 0) {
        std::fill(ok, ok + bins, scalar_t(0));
        continue;
      }
      const scalar_t* plane = in + (b * c_n + c) * h * w;  // (H, W)
      for (int ph = 0; ph < ph_n; ++ph) {
        const int* yr = ry + (k * ph_n + ph) * 2;
        const acc_t* wyr = wy + (k * ph_n + ph) * h;
        for (int pw = 0; pw < pw_n; ++pw) {
          const int* xr = rx + (k * pw_n + pw) * 2;
          const acc_t* wxr = wx + (k * pw_n + pw) * w;
          acc_t s = 0;
          for (int y = yr[0]; y < yr[1]; ++y) {
            const scalar_t* row = plane + y * w;
            acc_t sx = 0;
            for (int x = xr[0]; x < xr[1]; ++x) sx += wxr[x] * static_cast<acc_t>(row[x]);
            s += wyr[y] * sx;
          }
          ok[ph * pw_n + pw] = static_cast<scalar_t>(s * norm[k]);
        }
      }
    }
  });
}

constexpr int64_t kChannelBlock = 64;

// Channels-last input: memory (N, H, W, C). Work item = (box, block of channels).
template <typename scalar_t>
void forward_cpu_nhwc(const at::Tensor& input, const Profiles& p, int ph_n, int pw_n,
                      at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c_n = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t k_n = out.size(0);
  const int64_t n_cb = (c_n + kChannelBlock - 1) / kChannelBlock;
  const scalar_t* in = input.data_ptr<scalar_t>();  // (N, H, W, C) in memory
  scalar_t* o = out.data_ptr<scalar_t>();           // (K, C, PH, PW)
  const acc_t* wy = p.wy.data_ptr<acc_t>();
  const acc_t* wx = p.wx.data_ptr<acc_t>();
  const int* ry = p.ry.data_ptr<int>();
  const int* rx = p.rx.data_ptr<int>();
  const int* meta = p.meta.data_ptr<int>();
  const acc_t* norm = p.norm.data_ptr<acc_t>();
  const int64_t bins = int64_t(ph_n) * pw_n;
  at::parallel_for(0, k_n * n_cb, 4, [&](int64_t begin, int64_t end) {
    acc_t acc[kChannelBlock], row[kChannelBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / n_cb, c0 = (item % n_cb) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, c_n - c0);
      scalar_t* ok = o + (k * c_n + c0) * bins;  // out[k, c0 + j, bin] = ok[j * bins + bin]
      const int b = meta[k * 5];
      if (b < 0) {
        std::fill(ok, ok + cb * bins, scalar_t(0));
        continue;
      }
      for (int ph = 0; ph < ph_n; ++ph) {
        const int* yr = ry + (k * ph_n + ph) * 2;
        const acc_t* wyr = wy + (k * ph_n + ph) * h;
        for (int pw = 0; pw < pw_n; ++pw) {
          const int* xr = rx + (k * pw_n + pw) * 2;
          const acc_t* wxr = wx + (k * pw_n + pw) * w;
          std::fill(acc, acc + cb, acc_t(0));
          for (int y = yr[0]; y < yr[1]; ++y) {
            std::fill(row, row + cb, acc_t(0));
            for (int x = xr[0]; x < xr[1]; ++x) {
              const acc_t wv = wxr[x];
              const scalar_t* px = in + ((b * h + y) * w + x) * c_n + c0;  // (cb,)
              for (int64_t j = 0; j < cb; ++j) row[j] += wv * static_cast<acc_t>(px[j]);
            }
            const acc_t a = wyr[y];
            for (int64_t j = 0; j < cb; ++j) acc[j] += a * row[j];
          }
          for (int64_t j = 0; j < cb; ++j)
            ok[j * bins + ph * pw_n + pw] = static_cast<scalar_t>(acc[j] * norm[k]);
        }
      }
    }
  });
}

// Boxes grouped by image in ascending box index (stable counting sort): fixes the order in which
// each input pixel sums its contributions.
void group_boxes(const int* meta, int64_t k_n, int64_t n_img, std::vector<int64_t>& offsets,
                 std::vector<int64_t>& order) {
  offsets.assign(n_img + 1, 0);
  for (int64_t k = 0; k < k_n; ++k)
    if (meta[k * 5] >= 0) ++offsets[meta[k * 5] + 1];
  for (int64_t n = 0; n < n_img; ++n) offsets[n + 1] += offsets[n];
  order.resize(offsets[n_img]);
  std::vector<int64_t> pos(offsets.begin(), offsets.end() - 1);
  for (int64_t k = 0; k < k_n; ++k)
    if (meta[k * 5] >= 0) order[pos[meta[k * 5]]++] = k;
}

template <typename scalar_t>
void backward_cpu(const at::Tensor& grad, const Profiles& p, int ph_n, int pw_n,
                  at::Tensor& gin) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_img = gin.size(0), c_n = gin.size(1), h = gin.size(2), w = gin.size(3);
  const int64_t k_n = grad.size(0);
  const scalar_t* g = grad.data_ptr<scalar_t>();  // (K, C, PH, PW)
  scalar_t* gi = gin.data_ptr<scalar_t>();        // (N, C, H, W)
  const acc_t* wy = p.wy.data_ptr<acc_t>();
  const acc_t* wx = p.wx.data_ptr<acc_t>();
  const int* ry = p.ry.data_ptr<int>();
  const int* rx = p.rx.data_ptr<int>();
  const acc_t* norm = p.norm.data_ptr<acc_t>();
  std::vector<int64_t> offsets, order;
  group_boxes(p.meta.data_ptr<int>(), k_n, n_img, offsets, order);
  const int64_t bins = int64_t(ph_n) * pw_n;
  at::parallel_for(0, n_img * c_n, 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(h * w);  // (H, W) fp32 (fp64 for double) scratch plane
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / c_n, c = nc % c_n;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = offsets[n]; j < offsets[n + 1]; ++j) {
        const int64_t k = order[j];
        const scalar_t* gk = g + (k * c_n + c) * bins;
        for (int ph = 0; ph < ph_n; ++ph) {
          const int* yr = ry + (k * ph_n + ph) * 2;
          const acc_t* wyr = wy + (k * ph_n + ph) * h;
          for (int pw = 0; pw < pw_n; ++pw) {
            const int* xr = rx + (k * pw_n + pw) * 2;
            const acc_t* wxr = wx + (k * pw_n + pw) * w;
            const acc_t gv = static_cast<acc_t>(gk[ph * pw_n + pw]) * norm[k];
            for (int y = yr[0]; y < yr[1]; ++y) {
              const acc_t a = gv * wyr[y];
              acc_t* row = acc.data() + y * w;
              for (int x = xr[0]; x < xr[1]; ++x) row[x] += a * wxr[x];
            }
          }
        }
      }
      scalar_t* dst = gi + nc * h * w;
      for (int64_t i = 0; i < h * w; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
    }
  });
}

// Channels-last gradient: memory (N, H, W, C). Work item = (image, block of channels), each
// owning an (H, W, cb) scratch block.
template <typename scalar_t>
void backward_cpu_nhwc(const at::Tensor& grad, const Profiles& p, int ph_n, int pw_n,
                       at::Tensor& gin) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_img = gin.size(0), c_n = gin.size(1), h = gin.size(2), w = gin.size(3);
  const int64_t k_n = grad.size(0);
  const int64_t n_cb = (c_n + kChannelBlock - 1) / kChannelBlock;
  const scalar_t* g = grad.data_ptr<scalar_t>();  // (K, C, PH, PW)
  scalar_t* gi = gin.data_ptr<scalar_t>();        // (N, H, W, C) in memory
  const acc_t* wy = p.wy.data_ptr<acc_t>();
  const acc_t* wx = p.wx.data_ptr<acc_t>();
  const int* ry = p.ry.data_ptr<int>();
  const int* rx = p.rx.data_ptr<int>();
  const acc_t* norm = p.norm.data_ptr<acc_t>();
  std::vector<int64_t> offsets, order;
  group_boxes(p.meta.data_ptr<int>(), k_n, n_img, offsets, order);
  const int64_t bins = int64_t(ph_n) * pw_n;
  at::parallel_for(0, n_img * n_cb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc;  // (H, W, cb)
    acc_t gv[kChannelBlock], a[kChannelBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / n_cb, c0 = (item % n_cb) * kChannelBlock;
      const int64_t cb = std::min(kChannelBlock, c_n - c0);
      acc.assign(h * w * cb, acc_t(0));
      for (int64_t jj = offsets[n]; jj < offsets[n + 1]; ++jj) {
        const int64_t k = order[jj];
        const scalar_t* gk = g + (k * c_n + c0) * bins;  // grad[k, c0 + j, bin]
        for (int ph = 0; ph < ph_n; ++ph) {
          const int* yr = ry + (k * ph_n + ph) * 2;
          const acc_t* wyr = wy + (k * ph_n + ph) * h;
          for (int pw = 0; pw < pw_n; ++pw) {
            const int* xr = rx + (k * pw_n + pw) * 2;
            const acc_t* wxr = wx + (k * pw_n + pw) * w;
            for (int64_t j = 0; j < cb; ++j)
              gv[j] = static_cast<acc_t>(gk[j * bins + ph * pw_n + pw]) * norm[k];
            for (int y = yr[0]; y < yr[1]; ++y) {
              for (int64_t j = 0; j < cb; ++j) a[j] = gv[j] * wyr[y];
              for (int x = xr[0]; x < xr[1]; ++x) {
                const acc_t wv = wxr[x];
                acc_t* dst = acc.data() + (y * w + x) * cb;
                for (int64_t j = 0; j < cb; ++j) dst[j] += a[j] * wv;
              }
            }
          }
        }
      }
      for (int64_t yx = 0; yx < h * w; ++yx) {
        scalar_t* dst = gi + (n * h * w + yx) * c_n + c0;
        const acc_t* src = acc.data() + yx * cb;
        for (int64_t j = 0; j < cb; ++j) dst[j] = static_cast<scalar_t>(src[j]);
      }
    }
  });
}

Profiles profiles_for(const at::Tensor& rois, at::ScalarType dtype, double spatial_scale,
                      int64_t ph, int64_t pw, int64_t n, int64_t h, int64_t w,
                      int64_t sampling_ratio, bool aligned, at::Tensor& rois_acc) {
  const auto acc = acc_dtype(dtype);
  rois_acc = rois.to(acc).contiguous();
  Profiles p = alloc_profiles(rois.size(0), ph, pw, h, w, rois_acc.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "fgclip_roi_align_profiles", [&] {
    compute_profiles_cpu<scalar_t>(rois_acc, spatial_scale, ph, pw, n, h, w, sampling_ratio,
                                   aligned, p);
  });
  return p;
}

at::Tensor roi_align_cpu(const at::Tensor& input_, const at::Tensor& rois, double spatial_scale,
                         int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned) {
  check_forward_args(input_, rois, spatial_scale, ph, pw, sampling_ratio);
  const bool cl = is_channels_last(input_);
  const auto input = cl ? input_ : input_.contiguous();
  const int64_t n = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t k = rois.size(0);
  auto out = at::empty({k, c, ph, pw}, input.options());
  if (out.numel() == 0) return out;
  if (h == 0 || w == 0) return out.zero_();
  at::Tensor rois_acc;
  Profiles p = profiles_for(rois, input.scalar_type(), spatial_scale, ph, pw, n, h, w,
                            sampling_ratio, aligned, rois_acc);
  // The CUDA op cannot check these without a host sync and pools such boxes to zero instead.
  const auto bad = p.meta.select(1, 0).lt(0).nonzero();
  if (bad.numel() > 0) {
    const int64_t row = bad[0][0].item<int64_t>();
    const int kind = p.meta[row][0].item<int>();
    TORCH_CHECK(kind != kBadIndex, "fgclip::roi_align: rois row ", row,
                " has a batch index outside [0, ", n, ")");
    TORCH_CHECK(false, "fgclip::roi_align: rois row ", row,
                " is not finite or too large for adaptive sampling (more than 2^31 - 1 samples "
                "per bin and axis)");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fgclip_roi_align_forward",
                                  [&] {
                                    if (cl)
                                      forward_cpu_nhwc<scalar_t>(input, p, ph, pw, out);
                                    else
                                      forward_cpu<scalar_t>(input, p, ph, pw, out);
                                  });
  return out;
}

// `deterministic` is accepted for schema parity with CUDA; the CPU backward is always the
// deterministic gather. `channels_last` selects the memory format of the returned gradient.
at::Tensor roi_align_backward_cpu(const at::Tensor& grad_, const at::Tensor& rois,
                                  double spatial_scale, int64_t ph, int64_t pw, int64_t n,
                                  int64_t c, int64_t h, int64_t w, int64_t sampling_ratio,
                                  bool aligned, bool /*deterministic*/, bool channels_last) {
  check_backward_args(grad_, rois, spatial_scale, ph, pw, n, c, h, w, sampling_ratio);
  const auto grad = grad_.contiguous();
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto gin = at::empty({n, c, h, w}, grad.options().memory_format(fmt));
  const bool cl = is_channels_last(gin);
  if (gin.numel() == 0) return gin;
  if (rois.size(0) == 0) return gin.zero_();
  at::Tensor rois_acc;
  Profiles p = profiles_for(rois, grad.scalar_type(), spatial_scale, ph, pw, n, h, w,
                            sampling_ratio, aligned, rois_acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "fgclip_roi_align_backward",
                                  [&] {
                                    if (cl)
                                      backward_cpu_nhwc<scalar_t>(grad, p, ph, pw, gin);
                                    else
                                      backward_cpu<scalar_t>(grad, p, ph, pw, gin);
                                  });
  return gin;
}

}  // namespace
}  // namespace fgclip::roi_align

// FRAGMENT so that other fgclip kernels built as separate libraries can add ops to the same
// namespace (a plain TORCH_LIBRARY may be registered only once per namespace).
TORCH_LIBRARY_FRAGMENT(fgclip, m) {
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int batch_size, int channels, int height, int width, "
      "int sampling_ratio, bool aligned, bool deterministic, bool channels_last=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(fgclip, CPU, m) {
  m.impl("roi_align", &fgclip::roi_align::roi_align_cpu);
  m.impl("roi_align_backward", &fgclip::roi_align::roi_align_backward_cpu);
}
