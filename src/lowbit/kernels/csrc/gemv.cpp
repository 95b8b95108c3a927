// lowbit's CPU GEMVs for 1..16 tokens: int16 activations (per token and group of columns, quantized
// here) times 4-bit group codes or int8 per-channel weights, int32 dot products per group, float32
// across groups. One build runs on any x86-64 CPU with AVX2 + FMA: the bodies (gemv_isa.h) are
// compiled for AVX2 (vpmaddwd) and for AVX512-VNNI (vpdpwssd on 256-bit vectors, AVX512-VL), and each
// call names the path it takes (`isas()` lists this CPU's).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ISA_NS avx2
#define DOT(acc, w, x) _mm256_add_epi32((acc), _mm256_madd_epi16((w), (x)))
#define DOT8(acc, u, s) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#include "gemv_isa.h"
#undef DOT8
#undef DOT
#undef ISA_NS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#define ISA_NS vnni
#define LOWBIT_ZMM 1  // 4-bit codes in groups of 64+ also on 512-bit vectors (bit for bit the 256-bit result)
#define DOT(acc, w, x) _mm256_dpwssd_epi32((acc), (w), (x))
#define DOT8(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#include "gemv_isa.h"
#undef LOWBIT_ZMM
#undef DOT8
#undef DOT
#undef ISA_NS
#pragma GCC pop_options

namespace {

enum Isa : int64_t { AVX2 = 0, VNNI = 1 };

bool supported(int64_t isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == AVX2) return avx2;
  if (isa == VNNI)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return false;
}

std::vector<std::string> isas() {
  std::vector<std::string> out;
  if (supported(AVX2)) out.emplace_back("avx2");
  if (supported(VNNI)) out.emplace_back("avx512vnni");
  return out;
}

// x (..., K) contiguous float32 on the CPU: the number of tokens (rows of K), checked to be 1..16.
int64_t check_x(const torch::Tensor& x, int64_t group, const char* what, int64_t step = 32) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              what, ": x must be a contiguous float32 CPU tensor (..., in)");
  const int64_t K = x.size(-1), T = K > 0 ? x.numel() / K : 0;
  TORCH_CHECK(T >= 1 && T <= 16, what, ": 1..16 tokens, got ", T);
  TORCH_CHECK(group > 0 && group % step == 0 && K % group == 0, what, ": groups of a multiple of ", step, " columns");
  return T;
}

// The output (..., N) for x (..., K).
torch::Tensor output(const torch::Tensor& x, int64_t N) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = N;
  return torch::empty(sizes, x.options());
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
              "bias must be contiguous float32 (out,)");
  return bias->data_ptr<float>();
}

// scale and minv of an affine group weight: contiguous float32 (N, G) each, or minv empty (no minimum:
// value = code·scale). Returns minv's data, nullptr when empty.
const float* check_group_params(const torch::Tensor& scale, const torch::Tensor& minv, int64_t N, int64_t G,
                                const char* what) {
  for (const auto* p : {&scale, &minv})
    TORCH_CHECK(p->scalar_type() == torch::kFloat32 && p->is_contiguous() && p->dim() == 2 && p->size(0) == N &&
                    (p->size(1) == G || (p == &minv && p->size(1) == 0)),
                what, ": scale and minv must be contiguous float32 (out, in / group); minv may be (out, 0)");
  return minv.numel() ? minv.data_ptr<float>() : nullptr;
}

// x's int16 codes per token and group, each group's scale and scaled code sum, on the chosen instruction set;
// top: max |x| (the caller compares it with the limit above which huge columns are taken apart).
struct Rows {
  std::vector<int16_t> q;
  std::vector<float> a, aq;
  float top;
  Rows(const float* x, int64_t T, int64_t K, int64_t G, int64_t group, int64_t isa)
      : q(T * K), a(T * G), aq(T * G) {
    top = isa == VNNI ? vnni::quantize_rows(x, T, K, group, q.data(), a.data(), aq.data())
                      : avx2::quantize_rows(x, T, K, group, q.data(), a.data(), aq.data());
  }
};

int64_t grain(int64_t K) { return std::max<int64_t>(4, 16384 / std::max<int64_t>(K, 1)); }

// The GEMVs over all N rows, split among torch's threads, on the chosen instruction set (q4_gemv, q8_gemv,
// a8w8_gemv and layer.h's one-call layer all run them).
// An affine group weight's GEMV over all N rows (codes as gemv_isa.h's Nibbles or Bytes, one per path).
template <class A, class V>
void affine_into(int64_t T, int64_t isa, const A& avx2_codes, const V& vnni_codes, const float* s, const float* m,
                 int64_t K, int64_t group, const Rows& r, const float* b, float* out, int64_t N) {
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    if (isa == VNNI)
      vnni::affine(int(T), vnni_codes, s, m, K, group, r.q.data(), r.a.data(), r.aq.data(), b, out, N, n0, n1);
    else
      avx2::affine(int(T), avx2_codes, s, m, K, group, r.q.data(), r.a.data(), r.aq.data(), b, out, N, n0, n1);
  });
}

void q4_into(int64_t T, int64_t isa, const uint8_t* c, const float* s, const float* m, int64_t K, int64_t group,
             const Rows& r, const float* b, float* out, int64_t N) {
  affine_into(T, isa, avx2::Nibbles{c}, vnni::Nibbles{c}, s, m, K, group, r, b, out, N);
}

void g8_into(int64_t T, int64_t isa, const int8_t* c, const float* s, const float* m, int64_t K, int64_t group,
             const Rows& r, const float* b, float* out, int64_t N) {
  affine_into(T, isa, avx2::Bytes{c}, vnni::Bytes{c}, s, m, K, group, r, b, out, N);
}

void q8_into(int64_t T, int64_t isa, const int8_t* w, const float* ws, int64_t K, int64_t group, const Rows& r,
             const float* b, float* out, int64_t N) {
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    if (isa == VNNI)
      vnni::q8(int(T), w, ws, K, group, r.q.data(), r.a.data(), b, out, N, n0, n1);
    else
      avx2::q8(int(T), w, ws, K, group, r.q.data(), r.a.data(), b, out, N, n0, n1);
  });
}

void a8_into(int64_t T, int64_t isa, const int8_t* w, const float* ws, int64_t K, const uint8_t* qa,
             const int8_t* qs, const float* s, const float* b, float* out, int64_t N) {
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    if (isa == VNNI)
      vnni::a8(int(T), w, ws, K, qa, qs, s, b, out, N, n0, n1);
    else
      avx2::a8(int(T), w, ws, K, qa, qs, s, b, out, N, n0, n1);
  });
}

// One token's int8 activation codes as lowbit.kernels.activations computes them (dynamic: s = max(max|x|,
// 1e-8) / 127; static: s given, > 0; q = clamp(round-half-even(x / s), ±127)), as |q| and q; false when x
// holds inf or NaN (where that function's result is not an int8 code).
bool quantize_a8(const float* x, int64_t K, float static_scale, uint8_t* qa, int8_t* qs, float* s) {
  float st = static_scale;
  if (!(st > 0.f)) {
    float m = 0.f;
    for (int64_t k = 0; k < K; ++k) m = std::max(m, std::fabs(x[k]));
    if (!std::isfinite(m)) return false;
    st = std::max(m, 1e-8f) / 127.f;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float r = std::nearbyint(x[k] / st);
    if (std::isnan(r)) return false;
    const int v = static_cast<int>(std::min(127.f, std::max(-127.f, r)));
    qs[k] = static_cast<int8_t>(v);
    qa[k] = static_cast<uint8_t>(v < 0 ? -v : v);
  }
  *s = st;
  return true;
}

// x (..., K) float32 → y (..., N) float32; an empty tensor instead when max|x| > limit (the caller takes
// the huge columns apart and calls again).
torch::Tensor q4_gemv(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                      const torch::Tensor& minv, int64_t group, const c10::optional<torch::Tensor>& bias,
                      double limit, int64_t isa) {
  const int64_t T = check_x(x, group, "q4_gemv");
  TORCH_CHECK(supported(isa), "q4_gemv: this CPU lacks instruction set ", isa);
  const int64_t K = x.size(-1), N = codes.size(0), G = K / group;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2 &&
                  codes.size(1) == K / 2, "q4_gemv: codes must be contiguous uint8 (out, in / 2)");
  const float* m = check_group_params(scale, minv, N, G, "q4_gemv");
  const float* b = bias_ptr(bias, N);
  Rows r(x.data_ptr<float>(), T, K, G, group, isa);
  if (!(r.top <= limit)) return torch::empty({0}, x.options());
  auto y = output(x, N);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  float* out = y.data_ptr<float>();
  q4_into(T, isa, c, s, m, K, group, r, b, out, N);
  return y;
}

torch::Tensor q8_gemv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& wscale, int64_t group,
                      const c10::optional<torch::Tensor>& bias, double limit, int64_t isa) {
  const int64_t T = check_x(x, group, "q8_gemv");
  TORCH_CHECK(supported(isa), "q8_gemv: this CPU lacks instruction set ", isa);
  const int64_t K = x.size(-1), N = w.size(0), G = K / group;
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.dim() == 2 && w.size(1) == K,
              "q8_gemv: w must be contiguous int8 (out, in)");
  TORCH_CHECK(wscale.scalar_type() == torch::kFloat32 && wscale.is_contiguous() && wscale.numel() == N,
              "q8_gemv: wscale must be contiguous float32 (out,)");
  const float* b = bias_ptr(bias, N);
  Rows r(x.data_ptr<float>(), T, K, G, group, isa);
  if (!(r.top <= limit)) return torch::empty({0}, x.options());
  auto y = output(x, N);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* ws = wscale.data_ptr<float>();
  float* out = y.data_ptr<float>();
  q8_into(T, isa, wp, ws, K, group, r, b, out, N);
  return y;
}

// Any affine grid of up to 8 bits as signed int8 codes with float32 scale and minv per block of `group` columns
// (a multiple of 16): value = code·scale + minv.
torch::Tensor g8_gemv(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                      const torch::Tensor& minv, int64_t group, const c10::optional<torch::Tensor>& bias,
                      double limit, int64_t isa) {
  const int64_t T = check_x(x, group, "g8_gemv", 16);
  TORCH_CHECK(supported(isa), "g8_gemv: this CPU lacks instruction set ", isa);
  const int64_t K = x.size(-1), N = codes.size(0), G = K / group;
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.is_contiguous() && codes.dim() == 2 && codes.size(1) == K,
              "g8_gemv: codes must be contiguous int8 (out, in)");
  const float* m = check_group_params(scale, minv, N, G, "g8_gemv");
  const float* b = bias_ptr(bias, N);
  Rows r(x.data_ptr<float>(), T, K, G, group, isa);
  if (!(r.top <= limit)) return torch::empty({0}, x.options());
  auto y = output(x, N);
  g8_into(T, isa, codes.data_ptr<int8_t>(), scale.data_ptr<float>(), m, K, group, r, b,
          y.data_ptr<float>(), N);
  return y;
}

// W8A8 for 1..16 tokens: x's int8 codes per token (quantize_a8), exact int32 dot products with the int8
// weight, y = acc·s·wscale + bias in float32: what int8-int8 (torch._int_mm) computes.
// An empty tensor when x holds inf or NaN (the caller then runs the torch kernel).
torch::Tensor a8w8_gemv(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& wscale,
                        const c10::optional<torch::Tensor>& bias, double static_scale, int64_t isa) {
  const int64_t T = check_x(x, 32, "a8w8_gemv");
  TORCH_CHECK(supported(isa), "a8w8_gemv: this CPU lacks instruction set ", isa);
  const int64_t K = x.size(-1), N = w.size(0);
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.dim() == 2 && w.size(1) == K,
              "a8w8_gemv: w must be contiguous int8 (out, in)");
  TORCH_CHECK(wscale.scalar_type() == torch::kFloat32 && wscale.is_contiguous() && wscale.numel() == N,
              "a8w8_gemv: wscale must be contiguous float32 (out,)");
  const float* b = bias_ptr(bias, N);
  const float* xp = x.data_ptr<float>();
  std::vector<uint8_t> qa(T * K);
  std::vector<int8_t> qs(T * K);
  std::vector<float> s(T);
  for (int64_t t = 0; t < T; ++t)
    if (!quantize_a8(xp + t * K, K, static_cast<float>(static_scale), qa.data() + t * K, qs.data() + t * K,
                     s.data() + t))
      return torch::empty({0}, x.options());
  auto y = output(x, N);
  a8_into(T, isa, w.data_ptr<int8_t>(), wscale.data_ptr<float>(), K, qa.data(), qs.data(), s.data(), b,
          y.data_ptr<float>(), N);
  return y;
}

#include "layer.h"

}  // namespace

#include "gemm_tiles.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isas", &isas, "the instruction-set paths this CPU runs, in order of preference (last: best)");
  m.def("q4_gemv", &q4_gemv, "int4 group GEMV (int16 activations), 1..16 tokens", py::arg("x"), py::arg("codes"), py::arg("scale"),
        py::arg("minv"), py::arg("group"), py::arg("bias"), py::arg("limit"), py::arg("isa"));
  m.def("q8_gemv", &q8_gemv, "int8 per-channel GEMV (int16 activations), 1..16 tokens", py::arg("x"), py::arg("w"), py::arg("wscale"),
        py::arg("group"), py::arg("bias"), py::arg("limit"), py::arg("isa"));
  m.def("g8_gemv", &g8_gemv, "affine int8-code group GEMV (int16 activations), 1..16 tokens", py::arg("x"),
        py::arg("codes"), py::arg("scale"), py::arg("minv"), py::arg("group"), py::arg("bias"), py::arg("limit"),
        py::arg("isa"));
  m.def("a8w8_gemv", &a8w8_gemv, "int8 activations (per token or static) x int8 per-channel weights, 1..16 tokens",
        py::arg("x"), py::arg("w"), py::arg("wscale"), py::arg("bias"), py::arg("static_scale"), py::arg("isa"));
  m.def("layer_step", &layer_step, "one Llama-family decoder layer for one token (layer.h)");
  m.def("q4_gemm", &q4_gemm, "int4 group weights, dequantized in row tiles, float32 GEMM (prefill)", py::arg("x"),
        py::arg("codes"), py::arg("scale"), py::arg("minv"), py::arg("group"), py::arg("bias"), py::arg("rows"), py::arg("cols"));
  m.def("q8_gemm", &q8_gemm, "int8 per-channel weights, dequantized in row tiles, float32 GEMM (prefill)",
        py::arg("x"), py::arg("w"), py::arg("wscale"), py::arg("bias"), py::arg("rows"), py::arg("cols"));
  m.def("g8_gemm", &g8_gemm, "affine int8-code group weights, dequantized in row tiles, float32 GEMM (prefill)",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("minv"), py::arg("group"), py::arg("bias"),
        py::arg("rows"), py::arg("cols"));
  m.def("g8_tile", &g8_tile, "rows [n0, n1) of an affine int8-code group weight in float32", py::arg("codes"),
        py::arg("scale"), py::arg("minv"), py::arg("group"), py::arg("n0"), py::arg("n1"));
  m.def("q4_tile", &q4_tile, "rows [n0, n1) of an int4 group weight in float32", py::arg("codes"), py::arg("scale"),
        py::arg("minv"), py::arg("group"), py::arg("n0"), py::arg("n1"));
  m.def("q8_tile", &q8_tile, "rows [n0, n1) of an int8 per-channel weight in float32", py::arg("w"),
        py::arg("wscale"), py::arg("n0"), py::arg("n1"));
}
