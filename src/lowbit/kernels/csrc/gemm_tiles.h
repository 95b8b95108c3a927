// Prefill (more than 8 tokens) for the packed int4-group and int8-per-channel weights: y = x·Ŵᵀ + b in
// float32. The packed weight is dequantized in tiles of rows into a float32 buffer that stays in cache
// (AVX2, well under 1 ns per weight), and each tile runs through torch's float32 GEMM (MKL sgemm) writing
// its slice of y's columns: the dequantize cost is shared by all tokens and the GEMM reads a cache-resident
// tile, not a RAM-resident float weight. gemv.cpp includes this file after its helpers.

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace tiles {

// rows [n0, n1), columns [k0, k1) (multiples of the group) of the int4 group weight as float32
// (n1 − n0, k1 − k0): value = code·scale + minv (one product, one sum: the same floats as the scalar
// formula, -ffp-contract=off).
static void dequant_q4(const uint8_t* codes, const float* scale, const float* minv, int64_t K, int64_t group,
                       int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out) {
  const int64_t G = K / group;
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * (K / 2);
    float* o = out + (n - n0) * (k1 - k0) - k0;
    for (int64_t g = k0 / group; g < k1 / group; ++g) {
      const __m256 s = _mm256_set1_ps(scale[n * G + g]),
                   m = minv ? _mm256_set1_ps(minv[n * G + g]) : _mm256_setzero_ps();
      for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
        const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int p = 0; p < 4; ++p) {
          const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
          _mm256_storeu_ps(o + k + 8 * p, _mm256_add_ps(_mm256_mul_ps(c, s), m));
        }
      }
    }
  }
}

// rows [n0, n1), columns [k0, k1) of the int8 per-channel weight as float32: value = code·wscale[n].
static void dequant_q8(const int8_t* w, const float* wscale, int64_t K, int64_t n0, int64_t n1, int64_t k0,
                       int64_t k1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    float* o = out + (n - n0) * (k1 - k0) - k0;
    const __m256 s = _mm256_set1_ps(wscale[n]);
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
      _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), s));
    }
    for (; k < k1; ++k) o[k] = static_cast<float>(row[k]) * wscale[n];
  }
}

// rows [n0, n1), columns [k0, k1) (multiples of the group) of an int8-code group weight as float32:
// value = code·scale + minv (one product, one sum, as the scalar formula).
static void dequant_g8(const int8_t* codes, const float* scale, const float* minv, int64_t K, int64_t group,
                       int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out) {
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = codes + n * K;
    float* o = out + (n - n0) * (k1 - k0) - k0;
    for (int64_t g = k0 / group; g < k1 / group; ++g) {
      const __m256 s = _mm256_set1_ps(scale[n * G + g]),
                   m = minv ? _mm256_set1_ps(minv[n * G + g]) : _mm256_setzero_ps();
      for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
        const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        _mm256_storeu_ps(o + k, _mm256_add_ps(_mm256_mul_ps(c, s), m));
      }
    }
  }
}

}  // namespace tiles
#pragma GCC pop_options

namespace {

// x (T, K) float32 contiguous, T ≥ 1 → y (T, N) = x·Ŵᵀ (+ bias), Ŵ dequantized in tiles of `rows` rows ×
// `cols` columns by `dequant(n0, n1, k0, k1, buffer)`; a row of tiles accumulates into y's columns
// [n0, n1) (the first with the bias, beta = 0, the next with beta = 1). Columns are split so that a tile
// has many rows however wide the layer: sgemm repacks x's panel on every call, and with a tile of few rows
// that repacking is most of the work (16 rows × 11008 columns ran at half float32's speed at 512 tokens).
// The rows of tiles are split among torch's threads (each its own buffer; the GEMM inside a parallel region
// runs on its calling thread); one thread: in order.
template <class F>
torch::Tensor tiled_gemm(const torch::Tensor& x, int64_t N, const c10::optional<torch::Tensor>& bias,
                         int64_t rows, int64_t cols, const char* what, F dequant) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              what, ": x must be a contiguous float32 CPU tensor (tokens, in)");
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(rows >= 1 && cols >= 1, what, ": tiles of at least one row and one column");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->dim() == 1 && bias->numel() == N && bias->is_cpu(),
                what, ": bias must be float32 (out,)");
  auto y = torch::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  if (K == 0) return bias.has_value() ? y.copy_(bias->expand({T, N})) : y.zero_();
  const int64_t tiles = (N + rows - 1) / rows;
  cols = std::min(cols, K);
  const size_t need = static_cast<size_t>(std::min(rows, N) * cols);
  const bool inference = c10::InferenceMode::is_enabled();  // worker threads do not inherit it: y is an
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {  // inference tensor when the caller is in it
    c10::InferenceMode guard(inference);
    // one buffer per thread, kept between calls: a fresh 1 MiB allocation per call is an mmap and 256 page
    // faults (~70 µs measured at 9 tokens on 576×576, a third of the layer's time)
    thread_local std::vector<float> buf;
    if (buf.size() < need) buf.resize(need);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows, n1 = std::min(N, n0 + rows), r = n1 - n0;
      auto out = y.narrow(1, n0, r);  // strides (N, 1): sgemm writes it in place (ldc = N)
      for (int64_t k0 = 0; k0 < K; k0 += cols) {
        const int64_t k1 = std::min(K, k0 + cols);
        dequant(n0, n1, k0, k1, buf.data());
        auto w = torch::from_blob(buf.data(), {r, k1 - k0}, x.options());
        auto xk = k0 == 0 && k1 == K ? x : x.narrow(1, k0, k1 - k0);  // strides (K, 1): lda = K
        if (k0 > 0)
          at::addmm_out(out, out, xk, w.t());
        else if (bias.has_value())
          at::addmm_out(out, bias->narrow(0, n0, r), xk, w.t());
        else
          at::mm_out(out, xk, w.t());
      }
    }
  });
  return y;
}

torch::Tensor q4_gemm(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                      const torch::Tensor& minv, int64_t group, const c10::optional<torch::Tensor>& bias,
                      int64_t rows, int64_t cols) {
  TORCH_CHECK(supported(AVX2), "q4_gemm: this CPU lacks AVX2 + FMA");
  const int64_t K = x.size(-1), N = codes.size(0);
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "q4_gemm: groups of a multiple of 32 columns");
  const int64_t G = K / group;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2 &&
                  codes.size(1) == K / 2, "q4_gemm: codes must be contiguous uint8 (out, in / 2)");
  const float* m = check_group_params(scale, minv, N, G, "q4_gemm");
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  TORCH_CHECK(cols % group == 0 || cols >= K, "q4_gemm: tile columns must be a multiple of the group");
  return tiled_gemm(x, N, bias, rows, cols, "q4_gemm", [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out) {
    tiles::dequant_q4(c, s, m, K, group, n0, n1, k0, k1, out);
  });
}

torch::Tensor q8_gemm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& wscale,
                      const c10::optional<torch::Tensor>& bias, int64_t rows, int64_t cols) {
  TORCH_CHECK(supported(AVX2), "q8_gemm: this CPU lacks AVX2 + FMA");
  const int64_t K = x.size(-1), N = w.size(0);
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && w.dim() == 2 && w.size(1) == K,
              "q8_gemm: w must be contiguous int8 (out, in)");
  TORCH_CHECK(wscale.scalar_type() == torch::kFloat32 && wscale.is_contiguous() && wscale.numel() == N,
              "q8_gemm: wscale must be contiguous float32 (out,)");
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* ws = wscale.data_ptr<float>();
  return tiled_gemm(x, N, bias, rows, cols, "q8_gemm", [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out) {
    tiles::dequant_q8(wp, ws, K, n0, n1, k0, k1, out);
  });
}

torch::Tensor g8_gemm(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                      const torch::Tensor& minv, int64_t group, const c10::optional<torch::Tensor>& bias,
                      int64_t rows, int64_t cols) {
  TORCH_CHECK(supported(AVX2), "g8_gemm: this CPU lacks AVX2 + FMA");
  const int64_t K = x.size(-1), N = codes.size(0);
  TORCH_CHECK(group > 0 && group % 16 == 0 && K % group == 0, "g8_gemm: groups of a multiple of 16 columns");
  const int64_t G = K / group;
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.is_contiguous() && codes.dim() == 2 && codes.size(1) == K,
              "g8_gemm: codes must be contiguous int8 (out, in)");
  const float* m = check_group_params(scale, minv, N, G, "g8_gemm");
  TORCH_CHECK(cols % group == 0 || cols >= K, "g8_gemm: tile columns must be a multiple of the group");
  const int8_t* c = codes.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  return tiled_gemm(x, N, bias, rows, cols, "g8_gemm", [&](int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out) {
    tiles::dequant_g8(c, s, m, K, group, n0, n1, k0, k1, out);
  });
}

// The dequantized rows [n0, n1) alone (tests: the tile equals the reference's dequantized weight).
torch::Tensor q4_tile(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& minv,
                      int64_t group, int64_t n0, int64_t n1) {
  const int64_t K = codes.size(1) * 2;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && scale.is_contiguous() &&
              minv.is_contiguous() && 0 <= n0 && n0 <= n1 && n1 <= codes.size(0) && K % group == 0 &&
              group % 32 == 0 && scale.size(0) == codes.size(0) && scale.size(1) == K / group &&
              (minv.sizes() == scale.sizes() || minv.numel() == 0), "q4_tile: bad arguments");
  auto out = torch::empty({n1 - n0, K}, scale.options());
  const float* m = minv.numel() ? minv.data_ptr<float>() : nullptr;
  tiles::dequant_q4(codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), m, K, group, n0, n1, 0, K, out.data_ptr<float>());
  return out;
}

torch::Tensor g8_tile(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& minv,
                      int64_t group, int64_t n0, int64_t n1) {
  const int64_t K = codes.size(1);
  TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.is_contiguous() && scale.is_contiguous() &&
              minv.is_contiguous() && 0 <= n0 && n0 <= n1 && n1 <= codes.size(0) && group > 0 && K % group == 0 &&
              group % 16 == 0 && scale.size(0) == codes.size(0) && scale.size(1) == K / group &&
              (minv.sizes() == scale.sizes() || minv.numel() == 0), "g8_tile: bad arguments");
  auto out = torch::empty({n1 - n0, K}, scale.options());
  const float* m = minv.numel() ? minv.data_ptr<float>() : nullptr;
  tiles::dequant_g8(codes.data_ptr<int8_t>(), scale.data_ptr<float>(), m, K, group, n0, n1, 0, K, out.data_ptr<float>());
  return out;
}

torch::Tensor q8_tile(const torch::Tensor& w, const torch::Tensor& wscale, int64_t n0, int64_t n1) {
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && wscale.is_contiguous() && 0 <= n0 &&
              n0 <= n1 && n1 <= w.size(0) && wscale.numel() == w.size(0), "q8_tile: bad arguments");
  auto out = torch::empty({n1 - n0, w.size(1)}, wscale.options());
  tiles::dequant_q8(w.data_ptr<int8_t>(), wscale.data_ptr<float>(), w.size(1), n0, n1, 0, w.size(1),
                    out.data_ptr<float>());
  return out;
}

}  // namespace
