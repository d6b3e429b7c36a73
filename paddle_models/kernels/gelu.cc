// torch2paddle's CPU kernel for the exact GELU, x / 2 * (1 + erf(x / sqrt(2))), float32.  Built and
// used as paddle_models/native.py says.
//
// Paddle 3.3's CPU GELU on [8, 256, 56, 56]: 20-30 ms; this kernel ~0.7x that (torch ~4 ms).
// 1 + erf(x) is computed as erfc(-x) = erfc(|x|) for x < 0 and 2 - erfc(|x|) for x >= 0: for
// x << 0 the sum 1 + erf(x) cancels, and erf's few-ulp error relative to 1 becomes the error of a
// small value (Paddle's and torch's GELU give 0 below x ~ -5.2).  Near 0, where erfc is ~1 and its
// ulps are coarse against erf's, erf comes from its Taylor series instead.  erfc(z) itself is
// exp(-z^2) N(z) / D(z): N and D polynomials with positive coefficients (no cancellation in float32),
// fitted here to erfc(z) exp(z^2) on [0, 9.3] (max relative error 3.7e-8 with the coefficients
// rounded to floats), z^2's rounding error carried by an FMA, exp from glibc's vector math library
// (libmvec) through an OpenMP SIMD declaration, as glibc's own math.h declares it under -ffast-math,
// while everything else keeps IEEE semantics.
// Why not libmvec's erfcf (this kernel's first version): its vector code hands every lane whose
// result is below float32's normal range (|x| > 13) to scalar code, ~17x slower at |x| > 15, and a
// model's maps hold such values (fcvit_b12's token mixer, seeded weights: its 60 GELUs took 34 ms of
// a batch-1 forward, 13 ms now); [1, 64, 56, 56] at N(0, 10^2) took 2.0 ms, torch 0.14, this 0.29.
// Here z is clamped where GELU leaves the normal range (9.3), so exp stays in libmvec's fast range
// (arguments >= -86.5).  Off float64 on N(0, 1) / N(0, 9) inputs (tests/test_native.py's samples,
// an AVX-512 CPU): this kernel max 1.9e-7 / 2.4e-7, mean 1.1e-8 / 2.3e-8 (the erfcf version: 1.0e-8
// / 2.3e-8); Paddle's GELU 4.6e-7 / 7.0e-7, 1.9e-8 / 5.7e-8; torch's 8.5e-7 / 1.1e-6, 1.8e-8 /
// 8.2e-8.  Whole models do not tell them apart.
//
// (A softmax by the same means was tried: 1.9x faster than Paddle's, still 2.6x slower than torch's,
// and further from float64 than Paddle's; left out.)

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

#pragma omp declare simd notinbranch
extern "C" float expf(float);

// Constants that one float rounds off by ~5e-8 relative are a float and the rest, so that the
// products carry no bias of one sign: 1/sqrt(2) rounded to a float is 1.7e-8 too small, which pulls
// every output below GELU's (Paddle's GELU has that bias; torch's has none).
constexpr float kSqrtHalf = 0.707106769084930419921875f, kSqrtHalfRest = 1.2101617485882343e-08f;
static inline float ScaledBySqrtHalf(float v) { return v * kSqrtHalf + v * kSqrtHalfRest; }
constexpr float kSmall = 0.5f;  // |x| below which erf's series is used

// 2 / sqrt(pi) rounded to a float is 5.2e-8 too large: every output near 0 was biased upwards.
constexpr float kTwoOverSqrtPi = 1.12837922573089599609375f, kTwoOverSqrtPiRest = -5.8635382771399236e-08f;

// erf(x) for |x| < kSmall: 2 / sqrt(pi) * sum_k (-1)^k x^(2k+1) / (k! (2k + 1)), to k = 7 (the next
// term is below 1e-9 of the sum).
static inline float ErfSeries(float x) {
  const float z = x * x;
  float sum = -1.0f / 75600.0f;
  sum = sum * z + 1.0f / 9360.0f;
  sum = sum * z - 1.0f / 1320.0f;
  sum = sum * z + 1.0f / 216.0f;
  sum = sum * z - 1.0f / 42.0f;
  sum = sum * z + 1.0f / 10.0f;
  sum = sum * z - 1.0f / 3.0f;
  sum = sum * z + 1.0f;
  const float y = x * sum;
  return y * kTwoOverSqrtPi + y * kTwoOverSqrtPiRest;
}

// erfc(z) exp(z^2) = N(z) / D(z) for z in [0, kLargest]: see the header.
static inline float ScaledErfc(float z) {
  const float n = (((0.03206091f * z + 0.225701973f) * z + 0.724210143f) * z + 1.23133063f) * z + 1.0f;
  const float d = ((((0.0568256527f * z + 0.40007636f) * z + 1.31156826f) * z + 2.38685012f) * z + 2.35971022f) * z + 1.0f;
  return n / d;
}

// |x / sqrt(2)| beyond which GELU(x) < 0 is below float32's normal range (9.2958); z is clamped there,
// so that exp(-z^2) stays normal and in libmvec's fast range.
constexpr float kLargest = 9.3f;

// Outputs below float32's normal range (GELU(x) for x < -13 or so; and 0 near 0, which is also
// subnormal at |x| < 2.4e-38) are flushed to a zero of x's sign, as torch's and Paddle's GELU give 0
// there.  A subnormal operand makes every x86 multiply-add that reads it ~100x slower: fcvit_b12's
// token-mixer 1x1 convs after a GELU took 2-5x longer with 0.01-1% subnormal inputs.
constexpr float kSmallestNormal = 1.17549435e-38f;

// In blocks, three loops each: gcc (12) vectorises a loop calling the SIMD exp, and one selecting
// between forms, but not both in one loop (the call stops its if-conversion): the exp's clamped
// argument, the exp, the rest.  Each block is read
// into a local copy first, so that dst may be src (t2p_gelu_, in place: a fresh conv or Linear
// output is overwritten instead of a new map allocated, whose page faults cost about as much as the
// GELU itself on CPU: [1, 256, 56, 56] 2.0 ms, 1.0 of it without them).
static void Gelu(const float* src, float* dst, int64_t n, int threads) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t block = 0; block < blocks; ++block) {
    float values[kBlock], gauss[kBlock];
    const int64_t start = block * kBlock, len = n - start < kBlock ? n - start : kBlock;
    std::memcpy(values, src + start, static_cast<size_t>(len) * sizeof(float));
    const float* __restrict__ v = values;
    float* __restrict__ out = dst + start;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float z = std::fabs(ScaledBySqrtHalf(v[i])), clamped = z < kLargest ? z : kLargest;
      gauss[i] = -(clamped * clamped);
    }
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) gauss[i] = expf(gauss[i]);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      // h (1 + erf(t)), each form with one rounding after its product (contracted to an FMA)
      const float t = ScaledBySqrtHalf(v[i]), h = 0.5f * v[i], z = std::fabs(t);
      const float clamped = z < kLargest ? z : kLargest, square = clamped * clamped;
      const float residual = __builtin_fmaf(clamped, clamped, -square);  // z^2 - square, exactly
      const float scaled = ScaledErfc(clamped), corrected = scaled - scaled * residual;  // exp(-residual)
      // h erfc(z), multiplied in the order that keeps it normal; 0 where GELU(x) underflows
      const float tail = ((z < kLargest ? h : 0.0f) * corrected) * gauss[i];
      const float near_zero = h + h * ErfSeries(t), negative = tail, positive = v[i] - tail;
      const float value = z < kSmall ? near_zero : (t < 0.0f ? negative : positive);
      out[i] = std::fabs(value) < kSmallestNormal ? 0.0f * v[i] : value;  // see kSmallestNormal
    }
  }
}

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x, int threads) {
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "t2p_gelu: float32 CPU tensors only");
  auto out = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  Gelu(x.data<float>(), out.data<float>(), x.numel(), threads);
  return {out};
}

void GeluInPlace(paddle::Tensor& x, int threads) {  // NOLINT: in place, as Paddle's API wants
  PD_CHECK(x.is_cpu() && x.dtype() == paddle::DataType::FLOAT32, "t2p_gelu_: float32 CPU tensors only");
  Gelu(x.data<float>(), x.data<float>(), x.numel(), threads);
}

PD_BUILD_OP(t2p_gelu)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(GeluForward));

PD_BUILD_OP(t2p_gelu_)
    .Inputs({"X"})
    .Outputs({"Out"})
    .Attrs({"threads: int"})
    .SetInplaceMap({{"X", "Out"}})
    .SetKernelFn(PD_KERNEL(GeluInPlace));  // one input: Paddle infers Out's shape and dtype from X
