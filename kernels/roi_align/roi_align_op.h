// Host-side argument checks and the per-box profile buffers shared by the CPU and CUDA ops.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace fgclip::roi_align {

// Profiles are always kept in the accumulation type: float for fp16/bf16/fp32, double for fp64.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rois(const at::Tensor& rois, const at::Tensor& like) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "fgclip::roi_align: rois must be (K, 5) [batch_index, x1, y1, x2, y2], got ",
              rois.sizes());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), "fgclip::roi_align: rois must be floating");
  TORCH_CHECK(rois.device() == like.device(), "fgclip::roi_align: rois on ", rois.device(),
              " but features on ", like.device());
}

// Scalar arguments (host values: checking them costs no sync). The kernels index bins, rows,
// columns and per-axis samples with int32.
inline void check_scalars(const char* op, double spatial_scale, int64_t ph, int64_t pw,
                          int64_t sampling_ratio) {
  constexpr int64_t kMax = 2147483647;
  TORCH_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0, op,
              ": spatial_scale must be finite and > 0, got ", spatial_scale);
  TORCH_CHECK(ph > 0 && pw > 0 && ph <= kMax && pw <= kMax, op,
              ": output size must be in [1, 2^31 - 1], got (", ph, ", ", pw, ")");
  TORCH_CHECK(sampling_ratio >= -kMax && sampling_ratio <= kMax, op,
              ": sampling_ratio must fit in int32, got ", sampling_ratio);
}

inline void check_forward_args(const at::Tensor& input, const at::Tensor& rois,
                               double spatial_scale, int64_t ph, int64_t pw,
                               int64_t sampling_ratio) {
  TORCH_CHECK(input.dim() == 4, "fgclip::roi_align: input must be (N, C, H, W), got ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "fgclip::roi_align: input must be fp16, bf16, fp32 or fp64");
  TORCH_CHECK(input.size(2) <= 2147483647 && input.size(3) <= 2147483647,
              "fgclip::roi_align: input H and W must be < 2^31, got ", input.sizes());
  check_scalars("fgclip::roi_align", spatial_scale, ph, pw, sampling_ratio);
  check_rois(rois, input);
}

inline void check_backward_args(const at::Tensor& grad, const at::Tensor& rois,
                                double spatial_scale, int64_t ph, int64_t pw, int64_t n,
                                int64_t c, int64_t h, int64_t w, int64_t sampling_ratio) {
  check_scalars("fgclip::roi_align_backward", spatial_scale, ph, pw, sampling_ratio);
  TORCH_CHECK(n >= 0 && c >= 0 && h >= 0 && w >= 0 && h <= 2147483647 && w <= 2147483647,
              "fgclip::roi_align_backward: bad input size (", n, ", ", c, ", ", h, ", ", w, ")");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              "fgclip::roi_align_backward: grad must be floating");
  check_rois(rois, grad);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == c &&
                  grad.size(2) == ph && grad.size(3) == pw,
              "fgclip::roi_align_backward: grad must be (K, C, PH, PW) = (", rois.size(0), ", ",
              c, ", ", ph, ", ", pw, "), got ", grad.sizes());
}

// Features that are channels-last in memory (FG-CLIP's dense map is a (B, h*w, D) token tensor
// viewed as (B, D, h, w)) take the NHWC kernels, which avoids a full copy here and in backward;
// any other layout is made NCHW-contiguous. A tensor that is both (C == 1 or H*W == 1) is NCHW.
inline bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Separable sampling weights of every box (see roi_align_common.h).
struct Profiles {
  at::Tensor wy;    // (K, PH, H) acc: row weights of each output row bin
  at::Tensor wx;    // (K, PW, W) acc: column weights of each output column bin
  at::Tensor ry;    // (K, PH, 2) int32: [lo, hi) support of each wy row
  at::Tensor rx;    // (K, PW, 2) int32: [lo, hi) support of each wx row
  at::Tensor meta;  // (K, 5) int32: [batch index or kBadIndex / kBadBox, y0, y1, x0, x1] (union)
  at::Tensor norm;  // (K,) acc: 1 / (grid_h * grid_w), 0 for boxes without samples
};

inline Profiles alloc_profiles(int64_t k, int64_t ph, int64_t pw, int64_t h, int64_t w,
                               const at::TensorOptions& acc_opts) {
  const auto iopts = acc_opts.dtype(at::kInt);
  return Profiles{at::zeros({k, ph, h}, acc_opts), at::zeros({k, pw, w}, acc_opts),
                  at::empty({k, ph, 2}, iopts),    at::empty({k, pw, 2}, iopts),
                  at::empty({k, 5}, iopts),        at::empty({k}, acc_opts)};
}

}  // namespace fgclip::roi_align
