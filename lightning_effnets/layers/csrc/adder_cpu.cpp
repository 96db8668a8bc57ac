// Direct CPU kernels for the AdderNet layer (arXiv:1912.13200): forward and input gradient.
//
//   forward     Y[n,o,p]  = -sum_k |X[k,p] - W[o,k]|                  (k = (c,i,j), p = output position)
//   input grad  dX[n,c,h,w] = sum_{i,j} sum_o G[n,o,p(h,w,i,j)] * clamp(W[o,c,i,j] - X[n,c,h,w], -1, 1)
//
// The weight gradient sum_p G[o,p] (X[k,p] - W[o,k]) is linear in X: it is Conv2d's weight gradient minus
// W * sum_p G, computed by PyTorch (oneDNN) on the Python side. Only the two pairwise reductions live here.
//
// Neither kernel unfolds the input: work is split into panels of PB consecutive positions (flattened over
// the batch); each panel gathers the K x PB slice of patches it needs into a small thread-local buffer
// ("implicit im2col"), then a register-blocked micro-kernel (OR output channels x PB positions for the forward,
// CR input channels x PB positions for the input gradient) streams over the reduction dimension. The forward
// uses |x - w| = x + w - 2 min(x, w), so its inner loop is two vector ops per pair (min, add); the per-position
// sum of x and per-filter sum of w are added once per output. The input gradient is computed per input pixel
// (gather of the gradient, no col2im scatter), so panels never write to the same element and need no atomics.
//
// Vectorisation is portable: the micro-kernels (adder_kernels.h, GCC vector extensions) are compiled three times,
// for AVX-512, AVX2+FMA and the baseline target, and selected at run time with __builtin_cpu_supports, so one
// cached binary runs on any x86-64 machine (no -march=native); other architectures and compilers get the
// baseline build only.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace effnets_adder {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define EFFNETS_X86 1
#else
#define EFFNETS_X86 0
#endif
#define EFFNETS_INLINE inline __attribute__((always_inline))

struct Geometry {
  int64_t N, C, H, W;       // input
  int64_t O, KH, KW;        // weight (O, C/groups, KH, KW)
  int64_t OH, OW;           // output
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t groups, Cg, Og, K;  // channels per group, reduction length K = Cg*KH*KW
};

// A run of consecutive panel positions that lie in one row (same sample n, same row r) of a feature map.
struct Run {
  int64_t n, row, col0, q0, len;
};

// Split positions [p0, p0 + count) of a (N, rows, cols) map into row runs; returns the number of runs.
inline int make_runs(int64_t p0, int64_t count, int64_t rows, int64_t cols, Run* runs) {
  int nr = 0;
  int64_t q = 0;
  const int64_t plane = rows * cols;
  while (q < count) {
    const int64_t p = p0 + q;
    const int64_t n = p / plane, rem = p % plane;
    const int64_t row = rem / cols, col = rem % cols;
    const int64_t len = std::min(cols - col, count - q);
    runs[nr++] = Run{n, row, col, q, len};
    q += len;
  }
  return nr;
}

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
struct ForwardArgs {
  Geometry g;
  const T* x;
  const T* wpack;  // [groups][ceil(Og/OR)][K][OR]
  const T* sumw;   // [O]
  T* y;
};

template <typename T>
void pack_forward_weight(const Geometry& g, const T* w, int OR, std::vector<T>& wpack, std::vector<T>& sumw) {
  const int64_t nob = (g.Og + OR - 1) / OR;
  wpack.assign(g.groups * nob * g.K * OR, T(0));
  sumw.assign(g.O, T(0));
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t o = 0; o < g.Og; ++o) {
      const T* src = w + (grp * g.Og + o) * g.K;
      T* dst = wpack.data() + ((grp * nob + o / OR) * g.K) * OR + o % OR;
      T s = 0;
      for (int64_t k = 0; k < g.K; ++k) {
        dst[k * OR] = src[k];
        s += src[k];
      }
      sumw[grp * g.Og + o] = s;
    }
}

// ------------------------------------------------------------------------------------------------ input grad
template <typename T>
struct InputGradArgs {
  Geometry g;
  const T* x;
  const T* gout;
  const T* wpack;  // [groups][KH*KW][ceil(Cg/CR)][Og][CR]
  T* dx;
};

template <typename T>
void pack_input_grad_weight(const Geometry& g, const T* w, int CR, std::vector<T>& wpack) {
  const int64_t ncb = (g.Cg + CR - 1) / CR, khw = g.KH * g.KW;
  wpack.assign(g.groups * khw * ncb * g.Og * CR, T(0));
  for (int64_t grp = 0; grp < g.groups; ++grp)
    for (int64_t o = 0; o < g.Og; ++o)
      for (int64_t c = 0; c < g.Cg; ++c)
        for (int64_t ij = 0; ij < khw; ++ij) {
          const T val = w[((grp * g.Og + o) * g.Cg + c) * khw + ij];
          wpack[((((grp * khw + ij) * ncb + c / CR) * g.Og + o) * CR) + c % CR] = val;
        }
}

// ------------------------------------------------------------------------------------------------ ISA variants
// Register blocking per instruction set: forward rows OR x 2 vectors, input-gradient rows CR x 2 vectors.
// AVX-512: 32 registers (OR=12: 24 accumulators; CR=4: 8 accumulators + 16 clamp bounds); AVX2 and baseline: 16.
enum Isa : int64_t { kAuto = 0, kBaseline = 1, kAvx2 = 2, kAvx512 = 3 };

namespace baseline {
#define EFFNETS_VECTOR_BYTES 16
#define EFFNETS_FORWARD_ROWS 6
#define EFFNETS_GRAD_ROWS 2
#define EFFNETS_HAS_FMA 0
#include "adder_kernels.h"
#undef EFFNETS_VECTOR_BYTES
#undef EFFNETS_FORWARD_ROWS
#undef EFFNETS_GRAD_ROWS
#undef EFFNETS_HAS_FMA
}  // namespace baseline

#if EFFNETS_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")
namespace avx2 {
#define EFFNETS_VECTOR_BYTES 32
#define EFFNETS_FORWARD_ROWS 6
#define EFFNETS_GRAD_ROWS 2
#define EFFNETS_HAS_FMA 1
#include "adder_kernels.h"
#undef EFFNETS_VECTOR_BYTES
#undef EFFNETS_FORWARD_ROWS
#undef EFFNETS_GRAD_ROWS
#undef EFFNETS_HAS_FMA
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,bmi,bmi2,popcnt")
namespace avx512 {
#define EFFNETS_VECTOR_BYTES 64
#define EFFNETS_FORWARD_ROWS 12
#define EFFNETS_GRAD_ROWS 4
#define EFFNETS_HAS_FMA 1
#include "adder_kernels.h"
#undef EFFNETS_VECTOR_BYTES
#undef EFFNETS_FORWARD_ROWS
#undef EFFNETS_GRAD_ROWS
#undef EFFNETS_HAS_FMA
}  // namespace avx512
#pragma GCC pop_options
#endif

bool isa_available(int64_t isa) {
#if EFFNETS_X86
  __builtin_cpu_init();
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("fma");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  if (isa == kAvx2 || isa == kAvx512) return false;
#endif
  return isa == kBaseline;
}

int64_t resolve_isa(int64_t isa) {
  if (isa == kAuto) {
    for (int64_t cand : {kAvx512, kAvx2})
      if (isa_available(cand)) return cand;
    return kBaseline;
  }
  TORCH_CHECK(isa >= kBaseline && isa <= kAvx512, "effnets_adder: unknown isa ", isa);
  TORCH_CHECK(isa_available(isa), "effnets_adder: instruction set ", isa, " is not supported by this CPU");
  return isa;
}

// ------------------------------------------------------------------------------------------------ ops
Geometry make_geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "effnets_adder: expected 4-d input and weight, got ", x.dim(), "-d and ",
              w.dim(), "-d");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "effnets_adder: stride, padding and dilation must have two entries");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "effnets_adder: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "effnets_adder: input and weight dtypes differ");
  Geometry g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.O = w.size(0), g.KH = w.size(2), g.KW = w.size(3);
  g.sh = stride[0], g.sw = stride[1], g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.groups = groups;
  TORCH_CHECK(groups >= 1 && g.C % groups == 0 && g.O % groups == 0 && w.size(1) * groups == g.C,
              "effnets_adder: input has ", g.C, " channels, weight ", w.sizes(), " with groups=", groups);
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0,
              "effnets_adder: invalid stride/padding/dilation");
  g.Cg = g.C / groups, g.Og = g.O / groups, g.K = g.Cg * g.KH * g.KW;
  g.OH = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "effnets_adder: input ", x.sizes(), " is smaller than the kernel");
  return g;
}

// Static facts of a kernel variant, read from its namespace.
struct Variant {
  int forward_rows, grad_rows;
  int64_t panel_float, panel_double;
};

Variant variant(int64_t isa) {
#if EFFNETS_X86
  if (isa == kAvx512)
    return {avx512::kForwardRows, avx512::kGradRows, avx512::panel_width<float>(), avx512::panel_width<double>()};
  if (isa == kAvx2)
    return {avx2::kForwardRows, avx2::kGradRows, avx2::panel_width<float>(), avx2::panel_width<double>()};
#endif
  return {baseline::kForwardRows, baseline::kGradRows, baseline::panel_width<float>(),
          baseline::panel_width<double>()};
}

template <typename T>
int64_t panel_count(const Variant& v, int64_t positions) {
  const int64_t pb = sizeof(T) == sizeof(float) ? v.panel_float : v.panel_double;
  return (positions + pb - 1) / pb;
}

template <typename T>
void run_forward(int64_t isa, const ForwardArgs<T>& a, int64_t b, int64_t e) {
#if EFFNETS_X86
  if (isa == kAvx512) return avx512::forward(a, b, e);
  if (isa == kAvx2) return avx2::forward(a, b, e);
#endif
  baseline::forward(a, b, e);
}

template <typename T>
void run_input_grad(int64_t isa, const InputGradArgs<T>& a, int64_t b, int64_t e) {
#if EFFNETS_X86
  if (isa == kAvx512) return avx512::input_grad(a, b, e);
  if (isa == kAvx2) return avx2::input_grad(a, b, e);
#endif
  baseline::input_grad(a, b, e);
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, int64_t isa) {
  const Geometry g = make_geometry(input, weight, stride, padding, dilation, groups);
  isa = resolve_isa(isa);
  const Variant var = variant(isa);
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty({g.N, g.O, g.OH, g.OW}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "effnets_adder_forward", [&] {
    std::vector<scalar_t> wpack, sumw;
    pack_forward_weight<scalar_t>(g, w.data_ptr<scalar_t>(), var.forward_rows, wpack, sumw);
    const ForwardArgs<scalar_t> a{g, x.data_ptr<scalar_t>(), wpack.data(), sumw.data(), y.data_ptr<scalar_t>()};
    const int64_t tasks = g.groups * panel_count<scalar_t>(var, g.N * g.OH * g.OW);
    at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) { run_forward(isa, a, b, e); });
  });
  return y;
}

at::Tensor input_grad(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      int64_t isa) {
  const Geometry g = make_geometry(input, weight, stride, padding, dilation, groups);
  isa = resolve_isa(isa);
  const Variant var = variant(isa);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.O &&
                  grad_output.size(2) == g.OH && grad_output.size(3) == g.OW,
              "effnets_adder: grad_output ", grad_output.sizes(), " does not match the output shape");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "effnets_adder: grad_output dtype differs");
  const at::Tensor x = input.contiguous(), w = weight.contiguous(), go = grad_output.contiguous();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "effnets_adder_input_grad", [&] {
    std::vector<scalar_t> wpack;
    pack_input_grad_weight<scalar_t>(g, w.data_ptr<scalar_t>(), var.grad_rows, wpack);
    const InputGradArgs<scalar_t> a{g, x.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), wpack.data(),
                                    dx.data_ptr<scalar_t>()};
    const int64_t tasks = g.groups * panel_count<scalar_t>(var, g.N * g.H * g.W);
    at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) { run_input_grad(isa, a, b, e); });
  });
  return dx;
}

int64_t best_isa() { return resolve_isa(kAuto); }

}  // namespace

TORCH_LIBRARY(effnets_adder, m) {
  m.def("forward(Tensor input, Tensor weight, int[] stride, int[] padding, int[] dilation, int groups, int isa=0) -> Tensor");
  m.def("input_grad(Tensor grad_output, Tensor input, Tensor weight, int[] stride, int[] padding, int[] dilation, "
        "int groups, int isa=0) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
  m.def("isa_available(int isa) -> bool", &isa_available);
}

TORCH_LIBRARY_IMPL(effnets_adder, CPU, m) {
  m.impl("forward", &forward);
  m.impl("input_grad", &input_grad);
}

}  // namespace effnets_adder
