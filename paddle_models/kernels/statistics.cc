// torch2paddle's CPU kernels for row statistics, float32: the corrected row mean (numerics.mean),
// GroupNorm's forward (numerics.GroupNorm) and the LayerNorm over the channels of an NCHW map
// (RegionViT's LayerNorm2d).  Built and used as paddle_models/native.py says.
//
// They compute what numerics.py computes with Paddle's ops, in the same order, in float32: the mean
// of a row as a pairwise sum's (16 interleaved running sums of at most 16 terms, then halves added
// in a tree: error ~log2(n) eps, as torch's cascade sums and numerics._blocked_mean), plus one
// correction pass, mu + mean(x - mu), which lands within rounding of the exact mean; GroupNorm's
// biased variance as the pairwise mean of the centred squares; then, per element,
// ((x - mean) * inv_std) * weight[c] + bias[c].  Paddle's ops take ~15 passes over the map for a
// GroupNorm and ~10 dygraph calls (FCViT runs 24 GroupNorms per forward: ~20% of fcvit_b12's
// dygraph time at batch 1); here four reads and one write, the (sample, group) rows split among
// threads, each computed as with one.
//
// The channel LayerNorm, per position of each sample: the mean of its C values, summed in double and
// rounded once; the biased variance of the float32 differences from it, likewise; then
// ((x - mean) / sqrt(variance + eps)) * weight[c] + bias[c], each step one float32 operation as
// LayerNorm2d's ops (its true division included).  Its statistics so land within rounding of the
// exact ones, where Paddle's float32 means over the channel axis sum naively; Paddle's ops take 6
// passes over the map with a broadcast divide (RegionViT's norms: ~75 ms of regionvit_small's ~700 ms
// dygraph forward at batch 8, two threads).  Positions are taken in blocks of 256 along the plane,
// the blocks split among threads.

#include <cmath>
#include <cstdint>
#include <vector>

#include "paddle/extension.h"

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kLeaf = kLanes * kLanes;  // a leaf: 16 lanes of at most 16 terms each

// sum of term(i) for i in [begin, end), pairwise
template <class Term>
float pairwise_sum(const Term& term, int64_t begin, int64_t end) {
  const int64_t n = end - begin;
  if (n > kLeaf) {
    const int64_t middle = begin + (n / 2 + kLanes - 1) / kLanes * kLanes;  // halves of whole lanes
    return pairwise_sum(term, begin, middle) + pairwise_sum(term, middle, end);
  }
  float lanes[kLanes] = {0.f};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += term(i + l);
  for (int64_t l = 0; i < end; ++i, ++l) lanes[l] += term(i);
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// the mean of row[0, n) within rounding of the exact one: pairwise, then corrected once
float corrected_mean(const float* row, int64_t n) {
  const float rough = pairwise_sum([row](int64_t i) { return row[i]; }, 0, n) / static_cast<float>(n);
  const float correction =
      pairwise_sum([row, rough](int64_t i) { return row[i] - rough; }, 0, n) / static_cast<float>(n);
  return rough + correction;
}

void check_float32_cpu(const paddle::Tensor& t, const char* what) {
  PD_CHECK(t.is_cpu() && t.dtype() == paddle::DataType::FLOAT32, what, ": float32 CPU tensors only");
}

// a norm's map x [B, C, ...] and its per-channel weight and bias [C]
void check_norm_operands(const paddle::Tensor& x, const paddle::Tensor& weight, const paddle::Tensor& bias,
                         const char* what) {
  for (const auto* t : {&x, &weight, &bias}) check_float32_cpu(*t, what);
  PD_CHECK(x.shape().size() >= 2, what, ": x must be [B, C, ...]");
  PD_CHECK(weight.numel() == x.shape()[1] && bias.numel() == x.shape()[1], what, ": weight and bias must hold C values");
}

}  // namespace

// rows [M, n] -> [M, 1], each row's corrected mean
std::vector<paddle::Tensor> RowMeanForward(const paddle::Tensor& rows) {
  check_float32_cpu(rows, "t2p_row_mean");
  PD_CHECK(rows.shape().size() == 2, "t2p_row_mean: rows must be [M, n]");
  const int64_t m = rows.shape()[0], n = rows.shape()[1];
  auto out = paddle::empty({m, 1}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* src = rows.data<float>();
  float* dst = out.data<float>();
  for (int64_t r = 0; r < m; ++r) dst[r] = corrected_mean(src + r * n, n);
  return {out};
}

// x [B, C, ...] -> GroupNorm(groups, epsilon) with per-channel weight and bias [C]
std::vector<paddle::Tensor> GroupNormForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                             const paddle::Tensor& bias, int groups, float epsilon, int threads) {
  check_norm_operands(x, weight, bias, "t2p_group_norm");
  const auto shape = x.shape();
  const int64_t batch = shape[0], channels = shape[1];
  PD_CHECK(groups > 0 && channels % groups == 0, "t2p_group_norm: C must split into the groups");
  const int64_t plane = channels == 0 ? 0 : x.numel() / (batch * channels);
  const int64_t per_group = channels / groups, n = per_group * plane;
  auto out = paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* src = x.data<float>();
  const float* w = weight.data<float>();
  const float* b = bias.data<float>();
  float* dst = out.data<float>();
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < batch * groups; ++row) {
    const float* in = src + row * n;
    float* y = dst + row * n;
    const float mean = corrected_mean(in, n);
    const float variance =
        pairwise_sum([in, mean](int64_t i) { const float d = in[i] - mean; return d * d; }, 0, n) /
        static_cast<float>(n);
    const float inv_std = 1.0f / std::sqrt(variance + epsilon);
    for (int64_t k = 0; k < per_group; ++k) {
      const int64_t c = (row % groups) * per_group + k;
      const float scale = w[c], shift = b[c];
      const float* in_c = in + k * plane;
      float* y_c = y + k * plane;
      for (int64_t i = 0; i < plane; ++i) y_c[i] = ((in_c[i] - mean) * inv_std) * scale + shift;
    }
  }
  return {out};
}

// x [B, C, ...] -> LayerNorm over C at every position, weight and bias [C] (any shape of C values)
std::vector<paddle::Tensor> ChannelLayerNormForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                                    const paddle::Tensor& bias, float epsilon, int threads) {
  check_norm_operands(x, weight, bias, "t2p_channel_layer_norm");
  const auto shape = x.shape();
  const int64_t batch = shape[0], channels = shape[1];
  PD_CHECK(channels > 0, "t2p_channel_layer_norm: at least one channel");
  const int64_t plane = batch == 0 ? 0 : x.numel() / (batch * channels);
  auto out = paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* src = x.data<float>();
  const float* w = weight.data<float>();
  const float* b = bias.data<float>();
  float* dst = out.data<float>();
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (plane + kBlock - 1) / kBlock;
  const double count = static_cast<double>(channels);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t task = 0; task < batch * blocks; ++task) {
    const int64_t sample = task / blocks, start = (task % blocks) * kBlock;
    const int64_t len = plane - start < kBlock ? plane - start : kBlock;
    const float* in = src + sample * channels * plane + start;
    float* y = dst + sample * channels * plane + start;
    double sum[kBlock], squares[kBlock];
    float mean[kBlock], std_dev[kBlock];
    for (int64_t i = 0; i < len; ++i) sum[i] = squares[i] = 0.0;
    for (int64_t c = 0; c < channels; ++c) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) sum[i] += in[c * plane + i];
    }
    for (int64_t i = 0; i < len; ++i) mean[i] = static_cast<float>(sum[i] / count);
    for (int64_t c = 0; c < channels; ++c) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const double d = in[c * plane + i] - mean[i];  // a float32 difference, squared exactly in double
        squares[i] += d * d;
      }
    }
    for (int64_t i = 0; i < len; ++i) std_dev[i] = std::sqrt(static_cast<float>(squares[i] / count) + epsilon);
    for (int64_t c = 0; c < channels; ++c) {
      const float scale = w[c], shift = b[c];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) y[c * plane + i] = ((in[c * plane + i] - mean[i]) / std_dev[i]) * scale + shift;
    }
  }
  return {out};
}

PD_BUILD_OP(t2p_row_mean)
    .Inputs({"Rows"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(RowMeanForward));

PD_BUILD_OP(t2p_group_norm)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Out"})
    .Attrs({"groups: int", "epsilon: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(GroupNormForward));

PD_BUILD_OP(t2p_channel_layer_norm)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Out"})
    .Attrs({"epsilon: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(ChannelLayerNormForward));
