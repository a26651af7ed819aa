// CUDA kernels of fgclip::roi_align (schema is defined by the CPU library, which must be loaded
// first).
//
// 1. profiles_kernel / meta_kernel: separable sampling weights per box (roi_align_common.h).
// 2. Forward: one thread per output bin; for the 1x1 FG-CLIP case with NCHW features one warp
//    per (box, channel), lanes stride over the box's pixels (row-contiguous reads) and a fixed
//    shuffle tree reduces. Channels-last features (FG-CLIP's permuted token tensor) are read in
//    place with the channel as the fastest thread index, which is already coalesced.
// 3. Backward, deterministic (default): one thread per input element (n, c, y, x) gathers from
//    the boxes of image n in ascending box order (boxes grouped by a stable sort), so every
//    gradient is a fixed-order sum: bit-identical run to run, no atomics, and bf16/fp16 outputs
//    are rounded once from an fp32 sum. Cost: each thread tests the union box of every box of its
//    image, O(N*C*H*W * boxes_per_image) cheap integer tests (broadcast loads of the same box
//    metadata across a block) plus O(PH*PW) MACs per hit. For FG-CLIP (a few boxes per image)
//    this is about the cost of writing the gradient; for detection-style 100s of boxes per image
//    the scatter path below is faster.
// 4. Backward with deterministic=false: one thread per grad element scatters with fp32 atomicAdd
//    into an fp32 buffer (torchvision's scheme; summation order varies run to run).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "roi_align_common.h"
#include "roi_align_op.h"

namespace fgclip::roi_align {
namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t work) {
  // Grid-stride loops cover the rest; 2^20 blocks is plenty to fill any current GPU.
  return static_cast<unsigned int>(std::min<int64_t>((work + kThreads - 1) / kThreads, 1 << 20));
}

#define FGCLIP_GRID_STRIDE(i, n)                                                        \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);             \
       i += int64_t(blockDim.x) * gridDim.x)

// One thread per (box, axis bin): K * (PH + PW) threads. Rows were zeroed by the allocation.
template <typename acc_t>
__global__ void profiles_kernel(const acc_t* __restrict__ rois, int64_t k_n, acc_t scale,
                                int ph_n, int pw_n, int h, int w, int sampling_ratio,
                                bool aligned, acc_t* wy, acc_t* wx, int* ry, int* rx) {
  const int per_box = ph_n + pw_n;
  FGCLIP_GRID_STRIDE(i, k_n * per_box) {
    const int64_t k = i / per_box;
    const int p = static_cast<int>(i % per_box);
    const acc_t* box = rois + k * 5;
    if (p < ph_n) {
      const auto ay = make_axis<acc_t>(box[2], box[4], scale, aligned, ph_n, sampling_ratio);
      axis_profile(ay, p, h, wy + (k * ph_n + p) * h, ry + (k * ph_n + p) * 2);
    } else {
      const int q = p - ph_n;
      const auto ax = make_axis<acc_t>(box[1], box[3], scale, aligned, pw_n, sampling_ratio);
      axis_profile(ax, q, w, wx + (k * pw_n + q) * w, rx + (k * pw_n + q) * 2);
    }
  }
}

// One thread per box: batch index (-1 when out of range), union support, normaliser.
template <typename acc_t>
__global__ void meta_kernel(const acc_t* __restrict__ rois, int64_t k_n, acc_t scale, int ph_n,
                            int pw_n, int64_t n_img, int h, int w, int sampling_ratio, bool aligned,
                            const int* __restrict__ ry, const int* __restrict__ rx, int* meta,
                            acc_t* norm) {
  FGCLIP_GRID_STRIDE(k, k_n) {
    const acc_t* box = rois + k * 5;
    const auto ay = make_axis<acc_t>(box[2], box[4], scale, aligned, ph_n, sampling_ratio);
    const auto ax = make_axis<acc_t>(box[1], box[3], scale, aligned, pw_n, sampling_ratio);
    norm[k] = box_norm(ay, ax);
    int y0 = h, y1 = 0, x0 = w, x1 = 0;
    for (int p = 0; p < ph_n; ++p) {
      const int* r = ry + (k * ph_n + p) * 2;
      if (r[1] > r[0]) y0 = min(y0, r[0]), y1 = max(y1, r[1]);
    }
    for (int p = 0; p < pw_n; ++p) {
      const int* r = rx + (k * pw_n + p) * 2;
      if (r[1] > r[0]) x0 = min(x0, r[0]), x1 = max(x1, r[1]);
    }
    int* m = meta + k * 5;
    m[0] = box_image(box, n_img, ay, ax);  // < 0: pools to zero (checking needs a host sync)
    m[1] = y0, m[2] = y1, m[3] = x0, m[4] = x1;
  }
}

// Thread index -> (box, channel, bin). NCHW: the bin varies fastest (neighbouring threads read
// neighbouring pixels of one plane); channels-last: the channel varies fastest (neighbouring
// threads read neighbouring channels of one pixel). Both keep reads coalesced.
template <bool CL>
__device__ __forceinline__ void split_output_index(int64_t i, int64_t c_n, int ph_n, int pw_n,
                                                   int64_t& k, int64_t& c, int& ph, int& pw) {
  if (CL) {
    c = i % c_n;
    const int64_t r = i / c_n;
    pw = static_cast<int>(r % pw_n);
    ph = static_cast<int>((r / pw_n) % ph_n);
    k = r / (int64_t(pw_n) * ph_n);
  } else {
    pw = static_cast<int>(i % pw_n);
    ph = static_cast<int>((i / pw_n) % ph_n);
    const int64_t kc = i / (int64_t(pw_n) * ph_n);
    k = kc / c_n;
    c = kc % c_n;
  }
}

// Offset of feature (b, c, y, x) for NCHW or channels-last memory.
template <bool CL>
__device__ __forceinline__ int64_t feature_offset(int64_t b, int64_t c, int y, int x,
                                                  int64_t c_n, int h, int w) {
  return CL ? ((b * h + y) * w + x) * c_n + c : ((b * c_n + c) * h + y) * w + x;
}

// One thread per output element (K, C, PH, PW).
template <typename scalar_t, typename acc_t, bool CL>
__global__ void forward_kernel(const scalar_t* __restrict__ in, int64_t c_n, int h, int w,
                               int ph_n, int pw_n, int64_t total, const acc_t* __restrict__ wy,
                               const acc_t* __restrict__ wx, const int* __restrict__ ry,
                               const int* __restrict__ rx, const int* __restrict__ meta,
                               const acc_t* __restrict__ norm, scalar_t* __restrict__ out) {
  FGCLIP_GRID_STRIDE(i, total) {
    int64_t k, c;
    int ph, pw;
    split_output_index<CL>(i, c_n, ph_n, pw_n, k, c, ph, pw);
    const int64_t o = ((k * c_n + c) * ph_n + ph) * pw_n + pw;  // output is (K, C, PH, PW)
    const int b = meta[k * 5];
    if (b < 0) {
      out[o] = scalar_t(0);
      continue;
    }
    const int* yr = ry + (k * ph_n + ph) * 2;
    const int* xr = rx + (k * pw_n + pw) * 2;
    const acc_t* wyr = wy + (k * ph_n + ph) * h;
    const acc_t* wxr = wx + (k * pw_n + pw) * w;
    acc_t s = 0;
    for (int y = yr[0]; y < yr[1]; ++y) {
      acc_t sx = 0;
      for (int x = xr[0]; x < xr[1]; ++x)
        sx += wxr[x] * static_cast<acc_t>(in[feature_offset<CL>(b, c, y, x, c_n, h, w)]);
      s += wyr[y] * sx;
    }
    out[o] = static_cast<scalar_t>(s * norm[k]);
  }
}

// 1x1 output, NCHW features: one warp per (box, channel); K * C warps.
template <typename scalar_t, typename acc_t>
__global__ void forward_1x1_kernel(const scalar_t* __restrict__ in, int64_t c_n, int h, int w,
                                   int64_t kc_total, const acc_t* __restrict__ wy,
                                   const acc_t* __restrict__ wx, const int* __restrict__ meta,
                                   const acc_t* __restrict__ norm, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  // The loop bound is uniform across a warp, so whole warps stay converged for the shuffles.
  for (int64_t kc = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; kc < kc_total;
       kc += warps) {
    const int64_t k = kc / c_n, c = kc % c_n;
    const int* m = meta + k * 5;
    const int b = m[0];
    acc_t s = 0;
    if (b >= 0) {
      const scalar_t* plane = in + (int64_t(b) * c_n + c) * h * w;  // (H, W)
      const int y0 = m[1], x0 = m[3], bw = m[4] - m[3];
      const int64_t area = int64_t(m[2] - m[1]) * max(bw, 0);  // can exceed 2^31 pixels
      const acc_t* wyr = wy + k * h;
      const acc_t* wxr = wx + k * w;
      for (int64_t t = lane; t < area; t += 32) {
        const int y = y0 + static_cast<int>(t / bw), x = x0 + static_cast<int>(t % bw);
        s += wyr[y] * wxr[x] * static_cast<acc_t>(plane[y * w + x]);
      }
    }
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) out[kc] = static_cast<scalar_t>(b >= 0 ? s * norm[k] : acc_t(0));
  }
}

// Deterministic backward: one thread per input element, in memory order (NCHW: x fastest;
// channels-last: c fastest).
template <typename scalar_t, typename acc_t, bool CL>
__global__ void backward_gather_kernel(
    const scalar_t* __restrict__ grad, int64_t c_n, int h, int w, int ph_n, int pw_n,
    int64_t total, const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
    const acc_t* __restrict__ wy, const acc_t* __restrict__ wx, const int* __restrict__ ry,
    const int* __restrict__ rx, const int* __restrict__ meta, const acc_t* __restrict__ norm,
    scalar_t* __restrict__ gin) {
  FGCLIP_GRID_STRIDE(i, total) {
    int64_t n, c;
    int y, x;
    if (CL) {
      c = i % c_n;
      const int64_t r = i / c_n;
      x = static_cast<int>(r % w);
      y = static_cast<int>((r / w) % h);
      n = r / (int64_t(h) * w);
    } else {
      x = static_cast<int>(i % w);
      y = static_cast<int>((i / w) % h);
      const int64_t nc = i / (int64_t(h) * w);
      n = nc / c_n;
      c = nc % c_n;
    }
    acc_t s = 0;
    for (int64_t j = offsets[n]; j < offsets[n + 1]; ++j) {
      const int64_t k = order[j];
      const int* m = meta + k * 5;
      if (y < m[1] || y >= m[2] || x < m[3] || x >= m[4]) continue;
      const scalar_t* gk = grad + (k * c_n + c) * ph_n * pw_n;  // (PH, PW)
      acc_t sk = 0;
      for (int ph = 0; ph < ph_n; ++ph) {
        const int* yr = ry + (k * ph_n + ph) * 2;
        if (y < yr[0] || y >= yr[1]) continue;
        acc_t t = 0;
        for (int pw = 0; pw < pw_n; ++pw) {
          const int* xr = rx + (k * pw_n + pw) * 2;
          if (x < xr[0] || x >= xr[1]) continue;
          t += wx[(k * pw_n + pw) * w + x] * static_cast<acc_t>(gk[ph * pw_n + pw]);
        }
        sk += wy[(k * ph_n + ph) * h + y] * t;
      }
      s += sk * norm[k];
    }
    gin[i] = static_cast<scalar_t>(s);
  }
}

// Non-deterministic backward: one thread per grad element (K, C, PH, PW), atomics into acc_t.
template <typename scalar_t, typename acc_t, bool CL>
__global__ void backward_scatter_kernel(const scalar_t* __restrict__ grad, int64_t c_n, int h,
                                        int w, int ph_n, int pw_n, int64_t total,
                                        const acc_t* __restrict__ wy,
                                        const acc_t* __restrict__ wx, const int* __restrict__ ry,
                                        const int* __restrict__ rx, const int* __restrict__ meta,
                                        const acc_t* __restrict__ norm, acc_t* __restrict__ buf) {
  FGCLIP_GRID_STRIDE(i, total) {
    int64_t k, c;
    int ph, pw;
    split_output_index<CL>(i, c_n, ph_n, pw_n, k, c, ph, pw);
    const int b = meta[k * 5];
    if (b < 0) continue;
    const int64_t gidx = ((k * c_n + c) * ph_n + ph) * pw_n + pw;  // grad is (K, C, PH, PW)
    const acc_t gv = static_cast<acc_t>(grad[gidx]) * norm[k];
    const int* yr = ry + (k * ph_n + ph) * 2;
    const int* xr = rx + (k * pw_n + pw) * 2;
    const acc_t* wyr = wy + (k * ph_n + ph) * h;
    const acc_t* wxr = wx + (k * pw_n + pw) * w;
    for (int y = yr[0]; y < yr[1]; ++y) {
      const acc_t a = gv * wyr[y];
      for (int x = xr[0]; x < xr[1]; ++x)
        atomicAdd(buf + feature_offset<CL>(b, c, y, x, c_n, h, w), a * wxr[x]);
    }
  }
}

Profiles profiles_cuda(const at::Tensor& rois, at::ScalarType dtype, double spatial_scale,
                       int64_t ph, int64_t pw, int64_t n, int64_t h, int64_t w,
                       int64_t sampling_ratio, bool aligned, cudaStream_t stream) {
  const auto rois_acc = rois.to(acc_dtype(dtype)).contiguous();  // (K, 5)
  const int64_t k = rois.size(0);
  Profiles p = alloc_profiles(k, ph, pw, h, w, rois_acc.options());
  AT_DISPATCH_FLOATING_TYPES(rois_acc.scalar_type(), "fgclip_roi_align_profiles_cuda", [&] {
    const auto scale = static_cast<scalar_t>(spatial_scale);
    profiles_kernel<scalar_t><<<blocks_for(k * (ph + pw)), kThreads, 0, stream>>>(
        rois_acc.data_ptr<scalar_t>(), k, scale, ph, pw, h, w, sampling_ratio, aligned,
        p.wy.data_ptr<scalar_t>(), p.wx.data_ptr<scalar_t>(), p.ry.data_ptr<int>(),
        p.rx.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    meta_kernel<scalar_t><<<blocks_for(k), kThreads, 0, stream>>>(
        rois_acc.data_ptr<scalar_t>(), k, scale, ph, pw, n, h, w, sampling_ratio, aligned,
        p.ry.data_ptr<int>(), p.rx.data_ptr<int>(), p.meta.data_ptr<int>(),
        p.norm.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p;
}

at::Tensor roi_align_cuda(const at::Tensor& input_, const at::Tensor& rois, double spatial_scale,
                          int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned) {
  check_forward_args(input_, rois, spatial_scale, ph, pw, sampling_ratio);
  const c10::cuda::CUDAGuard guard(input_.device());
  const bool cl = is_channels_last(input_);
  const auto input = cl ? input_ : input_.contiguous();
  const int64_t n = input.size(0), c = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t k = rois.size(0);
  auto out = at::empty({k, c, ph, pw}, input.options());
  if (out.numel() == 0) return out;
  if (h == 0 || w == 0) return out.zero_();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Boxes with an out-of-range batch index or non-finite values pool to zero (checking would
  // need a host sync; the Python checker rejects them while the rois are still on the host).
  Profiles p =
      profiles_cuda(rois, input.scalar_type(), spatial_scale, ph, pw, n, h, w, sampling_ratio,
                    aligned, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fgclip_roi_align_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (cl) {
          forward_kernel<scalar_t, acc_t, true><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
              input.data_ptr<scalar_t>(), c, h, w, ph, pw, out.numel(), p.wy.data_ptr<acc_t>(),
              p.wx.data_ptr<acc_t>(), p.ry.data_ptr<int>(), p.rx.data_ptr<int>(),
              p.meta.data_ptr<int>(), p.norm.data_ptr<acc_t>(), out.data_ptr<scalar_t>());
        } else if (ph == 1 && pw == 1) {
          const int64_t kc = k * c;
          forward_1x1_kernel<scalar_t, acc_t><<<blocks_for(kc * 32), kThreads, 0, stream>>>(
              input.data_ptr<scalar_t>(), c, h, w, kc, p.wy.data_ptr<acc_t>(),
              p.wx.data_ptr<acc_t>(), p.meta.data_ptr<int>(), p.norm.data_ptr<acc_t>(),
              out.data_ptr<scalar_t>());
        } else {
          forward_kernel<scalar_t, acc_t, false><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
              input.data_ptr<scalar_t>(), c, h, w, ph, pw, out.numel(), p.wy.data_ptr<acc_t>(),
              p.wx.data_ptr<acc_t>(), p.ry.data_ptr<int>(), p.rx.data_ptr<int>(),
              p.meta.data_ptr<int>(), p.norm.data_ptr<acc_t>(), out.data_ptr<scalar_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad_, const at::Tensor& rois,
                                   double spatial_scale, int64_t ph, int64_t pw, int64_t n,
                                   int64_t c, int64_t h, int64_t w, int64_t sampling_ratio,
                                   bool aligned, bool deterministic, bool channels_last) {
  check_backward_args(grad_, rois, spatial_scale, ph, pw, n, c, h, w, sampling_ratio);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const auto grad = grad_.contiguous();
  const int64_t k = rois.size(0);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (n * c * h * w == 0) return at::empty({n, c, h, w}, grad.options().memory_format(fmt));
  if (k == 0) return at::zeros({n, c, h, w}, grad.options().memory_format(fmt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Profiles p =
      profiles_cuda(rois, grad.scalar_type(), spatial_scale, ph, pw, n, h, w, sampling_ratio,
                    aligned, stream);
  if (!deterministic) {
    auto buf = at::zeros({n, c, h, w},
                         grad.options().dtype(acc_dtype(grad.scalar_type())).memory_format(fmt));
    const bool cl = is_channels_last(buf);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, grad.scalar_type(), "fgclip_roi_align_backward_scatter", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const auto launch = [&](auto kernel) {
            kernel<<<blocks_for(grad.numel()), kThreads, 0, stream>>>(
                grad.data_ptr<scalar_t>(), c, h, w, ph, pw, grad.numel(), p.wy.data_ptr<acc_t>(),
                p.wx.data_ptr<acc_t>(), p.ry.data_ptr<int>(), p.rx.data_ptr<int>(),
                p.meta.data_ptr<int>(), p.norm.data_ptr<acc_t>(), buf.data_ptr<acc_t>());
          };
          if (cl)
            launch(backward_scatter_kernel<scalar_t, acc_t, true>);
          else
            launch(backward_scatter_kernel<scalar_t, acc_t, false>);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
    return buf.to(grad.scalar_type());  // keeps buf's memory format
  }
  // Group boxes by image with a stable sort: segment n of `order` lists image n's boxes in
  // ascending index; invalid boxes (kBadIndex, kBadBox < 0) sort first and fall outside every segment.
  const auto bidx = p.meta.select(1, 0).contiguous();                   // (K,) int32
  const auto sorted = at::sort(bidx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto order = std::get<1>(sorted).contiguous();                  // (K,) int64
  const auto bounds = at::arange(n + 1, bidx.options());                // (N + 1,) int32
  const auto offsets = at::searchsorted(std::get<0>(sorted), bounds).contiguous();  // int64
  auto gin = at::empty({n, c, h, w}, grad.options().memory_format(fmt));
  const bool cl = is_channels_last(gin);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "fgclip_roi_align_backward_gather", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto launch = [&](auto kernel) {
          kernel<<<blocks_for(gin.numel()), kThreads, 0, stream>>>(
              grad.data_ptr<scalar_t>(), c, h, w, ph, pw, gin.numel(), order.data_ptr<int64_t>(),
              offsets.data_ptr<int64_t>(), p.wy.data_ptr<acc_t>(), p.wx.data_ptr<acc_t>(),
              p.ry.data_ptr<int>(), p.rx.data_ptr<int>(), p.meta.data_ptr<int>(),
              p.norm.data_ptr<acc_t>(), gin.data_ptr<scalar_t>());
        };
        if (cl)
          launch(backward_gather_kernel<scalar_t, acc_t, true>);
        else
          launch(backward_gather_kernel<scalar_t, acc_t, false>);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return gin;
}

}  // namespace
}  // namespace fgclip::roi_align

TORCH_LIBRARY_IMPL(fgclip, CUDA, m) {
  m.impl("roi_align", &fgclip::roi_align::roi_align_cuda);
  m.impl("roi_align_backward", &fgclip::roi_align::roi_align_backward_cuda);
}
