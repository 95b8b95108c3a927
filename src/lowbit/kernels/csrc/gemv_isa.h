// The GEMV bodies, compiled once per instruction set: gemv.cpp includes this file inside a
// `#pragma GCC target(...)` region with ISA_NS (the namespace) and DOT(acc, u8, s8) defined:
// acc (8 x int32) += the sums of 4 adjacent products u8[i]·s8[i] (exact: every product fits), and
// DOT2(acc, u, s, v, r): the same for two pairs, u and v 4-bit codes (int16 sums of 4 products fit).
// Every path computes the same integers and the same float operations in the same order, so
// they agree bit for bit (tests/kernels/test_cpp_kernels.py checks it where two paths run).

namespace ISA_NS {

// Where a 64-column unit's four runs of 16 go in q (paired layout, see unpack64).
static constexpr int64_t kPair[4] = {0, 32, 16, 48};

// Per token t and group g of `group` columns: a[t,g] = max|x| / 127, q = round(x / a) in int8,
// aq[t,g] = a[t,g]·Σq; with `paired`, each whole 64-column unit of q in unpack64's order. Returns max|x| over everything, inf or NaN where x holds one (the caller
// refuses huge activations).
static float quantize_rows(const float* x, int64_t T, int64_t K, int64_t group, bool paired, int8_t* q, float* a,
                           float* aq) {
  const int64_t G = K / group, K64 = paired ? K / 64 * 64 : 0;
  uint32_t top_bits = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + t * K + g * group;
      // max|x| on the bits: for |x| the integer order is the float order, and inf or NaN compare above
      // every finite value, so they reach `top` (the caller then refuses the call)
      uint32_t mb = 0;
      for (int64_t k = 0; k < group; ++k) {
        uint32_t b;
        std::memcpy(&b, xg + k, 4);
        mb = std::max(mb, b & 0x7fffffffu);
      }
      top_bits = std::max(top_bits, mb);
      float m;
      std::memcpy(&m, &mb, 4);
      const float inv = (m > 0.f && mb < 0x7f800000u) ? 127.f / m : 0.f;
      int32_t sum = 0;
      for (int64_t k = 0; k < group; ++k) {
        const float r = std::nearbyint(xg[k] * inv);
        const int32_t v = static_cast<int32_t>(std::min(127.f, std::max(-127.f, r)));
        const int64_t col = g * group + k;  // in whole 64-column units, q16..31 and q32..47 trade places
        const int64_t at = col < K64 ? (col & ~int64_t(63)) | kPair[(col >> 4) & 3] | (col & 15) : col;
        q[t * K + at] = static_cast<int8_t>(v);
        sum += v;
      }
      a[t * G + g] = m / 127.f;
      aq[t * G + g] = (m / 127.f) * static_cast<float>(sum);
    }
  }
  float top;
  std::memcpy(&top, &top_bits, 4);
  return top;
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 four-bit codes from 16 bytes: byte j holds code j (low nibble) and code j + 16 (high nibble).
static inline __m256i unpack32(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, m);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
  return _mm256_set_m128i(hi, lo);
}

// 64 four-bit codes from 32 bytes (two runs of 16 bytes as unpack32 reads them: codes c0, c1 of two
// 32-column chunks): lo = c0[0..15] c1[0..15], hi = c0[16..31] c1[16..31]; the activations are laid
// out in that order (quantize_rows, paired), so int32 lanes 0-3 belong to chunk c0 and 4-7 to c1.
static inline void unpack64(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(v, m);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
}

// y[t, n] = Σ_g a[t,g]·(scale[n,g]·Σ_k c[n,k]·q[t,k] + minv[n,g]·Σ_k q[t,k]) + bias[n]
// for rows n in [n0, n1): value = c·scale + minv, c the unsigned 4-bit code; q in the paired layout.
template <int T>
static void q4_rows(const uint8_t* codes, const float* scale, const float* minv, int64_t K, int64_t group,
                    const int8_t* q, const float* a, const float* aq, const float* bias, float* y, int64_t N,
                    int64_t n0, int64_t n1) {
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * (K / 2);
    const float* s = scale + n * G;
    const float* mn = minv + n * G;
    __m256 acc[T];
    float off[T];
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm256_setzero_ps();
      off[t] = 0.f;
    }
    if (group >= 64) {  // whole 64-column units per group
      for (int64_t g = 0; g < G; ++g) {
        __m256i dot[T];
        for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_si256();
        for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
          __m256i lo, hi;
          unpack64(row + k / 2, lo, hi);
          for (int t = 0; t < T; ++t) {
            const int8_t* qt = q + t * K + k;
            dot[t] = DOT2(dot[t], lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qt)), hi,
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qt + 32)));
          }
        }
        for (int t = 0; t < T; ++t) {
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), _mm256_set1_ps(s[g] * a[t * G + g]), acc[t]);
          off[t] += mn[g] * aq[t * G + g];
        }
      }
    } else {  // group 32: a 64-column unit holds groups g (lanes 0-3) and g + 1 (lanes 4-7)
      int64_t g = 0;
      for (; g + 1 < G; g += 2) {
        const int64_t k = 32 * g;
        __m256i lo, hi;
        unpack64(row + k / 2, lo, hi);
        for (int t = 0; t < T; ++t) {
          const int8_t* qt = q + t * K + k;
          const __m256i dot = DOT2(_mm256_setzero_si256(), lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qt)),
                                   hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qt + 32)));
          const __m256 sa = _mm256_set_m128(_mm_set1_ps(s[g + 1] * a[t * G + g + 1]), _mm_set1_ps(s[g] * a[t * G + g]));
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sa, acc[t]);
          off[t] += mn[g] * aq[t * G + g];
          off[t] += mn[g + 1] * aq[t * G + g + 1];
        }
      }
      if (g < G) {  // an odd last group: 32 columns in their natural order
        const int64_t k = 32 * g;
        const __m256i w = unpack32(row + k / 2);
        for (int t = 0; t < T; ++t) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + t * K + k));
          const __m256i dot = DOT(_mm256_setzero_si256(), w, xv);
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s[g] * a[t * G + g]), acc[t]);
          off[t] += mn[g] * aq[t * G + g];
        }
      }
    }
    const float b = bias ? bias[n] : 0.f;
    for (int t = 0; t < T; ++t) y[t * N + n] = hsum(acc[t]) + off[t] + b;
  }
}

// y[t, n] = wscale[n]·Σ_g a[t,g]·Σ_k w[n,k]·q[t,k] + bias[n], w signed int8 (|w| as u8, its sign on q).
template <int T>
static void q8_rows(const int8_t* w, const float* wscale, int64_t K, int64_t group, const int8_t* q,
                    const float* a, const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / group, chunks = group / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256i dot[T];
      for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_si256();
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t k = g * group + 32 * c;
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        const __m256i wabs = _mm256_sign_epi8(wv, wv);  // -128 stays 0x80: 128 as unsigned
        for (int t = 0; t < T; ++t) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + t * K + k));
          dot[t] = DOT(dot[t], wabs, _mm256_sign_epi8(xv, wv));
        }
      }
      for (int t = 0; t < T; ++t)
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), _mm256_set1_ps(a[t * G + g]), acc[t]);
    }
    const float b = bias ? bias[n] : 0.f;
    for (int t = 0; t < T; ++t) y[t * N + n] = hsum(acc[t]) * wscale[n] + b;
  }
}

// At most 4 tokens per pass (their accumulators stay in registers); more run as passes of 4 over
// blocks of rows holding kBlockBytes of weights, so the second pass reads them from cache, not memory.
static constexpr int64_t kBlockBytes = 128 * 1024;
static void q4(int T, const uint8_t* codes, const float* scale, const float* minv, int64_t K, int64_t group,
               const int8_t* q, const float* a, const float* aq, const float* bias, float* y, int64_t N,
               int64_t n0, int64_t n1) {
  const int64_t G = K / group, rows = T > 4 ? std::max<int64_t>(4, kBlockBytes / (K / 2)) : n1 - n0;
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    const int64_t b1 = std::min(n1, b0 + rows);
    for (int t0 = 0; t0 < T; t0 += 4) {
      const int8_t* qt = q + t0 * K;
      const float *at = a + t0 * G, *aqt = aq + t0 * G;
      float* yt = y + t0 * N;
      switch (std::min(4, T - t0)) {
#define LOWBIT_CASE(t) case t: q4_rows<t>(codes, scale, minv, K, group, qt, at, aqt, bias, yt, N, b0, b1); break;
        LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
#undef LOWBIT_CASE
      }
    }
  }
}

static void q8(int T, const int8_t* w, const float* wscale, int64_t K, int64_t group, const int8_t* q,
               const float* a, const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / group, rows = T > 4 ? std::max<int64_t>(4, kBlockBytes / K) : n1 - n0;
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    const int64_t b1 = std::min(n1, b0 + rows);
    for (int t0 = 0; t0 < T; t0 += 4) {
      const int8_t* qt = q + t0 * K;
      const float* at = a + t0 * G;
      float* yt = y + t0 * N;
      switch (std::min(4, T - t0)) {
#define LOWBIT_CASE(t) case t: q8_rows<t>(w, wscale, K, group, qt, at, bias, yt, N, b0, b1); break;
        LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
#undef LOWBIT_CASE
      }
    }
  }
}

}  // namespace ISA_NS
