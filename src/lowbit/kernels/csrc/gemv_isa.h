// The GEMV bodies, compiled once per instruction set: gemv.cpp includes this file inside a
// `#pragma GCC target(...)` region with ISA_NS (the namespace) and DOT(acc, w, x) defined:
// acc (8 x int32) += w[2i]·x[2i] + w[2i+1]·x[2i+1] for 16 int16 lanes (vpmaddwd + vpaddd on AVX2,
// vpdpwssd on AVX512-VNNI). Every sum fits in int32, so all paths compute the same integers, then
// the same float operations in the same order: they agree bit for bit (tests/kernels/test_cpp_kernels.py).

namespace ISA_NS {

// Per token t and group g of `group` columns: a[t,g] = max|x| / 32767, q = round(x / a) in int16,
// aq[t,g] = a[t,g]·Σq. Returns max|x| over everything, inf or NaN where x holds one (the caller
// refuses huge activations).
static float quantize_rows(const float* x, int64_t T, int64_t K, int64_t group, int16_t* q, float* a, float* aq) {
  const int64_t G = K / group;
  uint32_t top_bits = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + t * K + g * group;
      int16_t* qg = q + t * K + g * group;
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
      const float inv = (m > 0.f && mb < 0x7f800000u) ? 32767.f / m : 0.f;
      int32_t sum = 0;
      for (int64_t k = 0; k < group; ++k) {
        const float r = std::nearbyint(xg[k] * inv);
        const int32_t v = static_cast<int32_t>(std::min(32767.f, std::max(-32767.f, r)));
        qg[k] = static_cast<int16_t>(v);
        sum += v;
      }
      a[t * G + g] = m / 32767.f;
      aq[t * G + g] = (m / 32767.f) * static_cast<float>(sum);
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

static inline __m256i load16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// The codes of an affine group weight as the GEMV reads them: `step` columns of row n at a time, as `parts`
// vectors of 16 int16 lanes. Nibbles: unsigned 4-bit codes, 32 columns in 16 bytes (byte j holds code j in its
// low nibble, code j + 16 in its high one). Bytes: signed int8 codes (lowbit.kernels.grid8_cpp's repack).
struct Nibbles {
  static constexpr int step = 32, parts = 2;
  const uint8_t* codes;
  int64_t row_bytes(int64_t K) const { return K / 2; }
  void load(int64_t n, int64_t K, int64_t k, __m256i* w) const {
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + n * (K / 2) + k / 2));
    w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(v, mask));                     // codes k..k+15
    w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), mask));  // k+16..k+31
  }
};

struct Bytes {
  static constexpr int step = 16, parts = 1;
  const int8_t* codes;
  int64_t row_bytes(int64_t K) const { return K; }
  void load(int64_t n, int64_t K, int64_t k, __m256i* w) const {
    w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + n * K + k)));
  }
};

// y[t, n] = Σ_g a[t,g]·(scale[n,g]·Σ_k c[n,k]·q[t,k] + minv[n,g]·Σ_k q[t,k]) + bias[n] for rows n in
// [n0, n1): value = c·scale + minv per group of `group` columns (a multiple of C::step); minv nullptr: none.
template <int T, class C>
static void affine_rows(const C& c, const float* scale, const float* minv, int64_t K, int64_t group,
                        const int16_t* q, const float* a, const float* aq, const float* bias, float* y, int64_t N,
                        int64_t n0, int64_t n1) {
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const float* s = scale + n * G;
    const float* mn = minv ? minv + n * G : nullptr;  // none: value = c·scale
    __m256 acc[T];
    float off[T];
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm256_setzero_ps();
      off[t] = 0.f;
    }
    for (int64_t g = 0; g < G; ++g) {
      __m256i dot[T];
      for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_si256();
      for (int64_t k = g * group; k < (g + 1) * group; k += C::step) {
        __m256i w[C::parts];
        c.load(n, K, k, w);
        for (int t = 0; t < T; ++t)
          for (int p = 0; p < C::parts; ++p) dot[t] = DOT(dot[t], w[p], load16(q + t * K + k + 16 * p));
      }
      for (int t = 0; t < T; ++t) {
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), _mm256_set1_ps(s[g] * a[t * G + g]), acc[t]);
        if (mn) off[t] += mn[g] * aq[t * G + g];
      }
    }
    const float b = bias ? bias[n] : 0.f;
    for (int t = 0; t < T; ++t) y[t * N + n] = hsum(acc[t]) + off[t] + b;
  }
}

#ifdef LOWBIT_ZMM
// affine_rows for 4-bit codes in groups of a multiple of 64, on 512-bit vectors: 64 columns per step (two
// 16-byte Nibbles chunks widened at once), two vpdpwssd on zmm. Each group's int32 dot is folded to the 256-bit
// path's 8 lanes (lane j holds columns 2j, 2j + 1 of every 16-column chunk there too; integer sums are exact)
// before the same float operations, so the result is affine_rows' bit for bit.
template <int T>
static void q4_rows_zmm(const uint8_t* codes, const float* scale, const float* minv, int64_t K, int64_t group,
                        const int16_t* q, const float* a, const float* aq, const float* bias, float* y, int64_t N,
                        int64_t n0, int64_t n1) {
  const int64_t G = K / group;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const float* s = scale + n * G;
    const float* mn = minv ? minv + n * G : nullptr;
    const uint8_t* row = codes + n * (K / 2);
    __m256 acc[T];
    float off[T];
    for (int t = 0; t < T; ++t) {
      acc[t] = _mm256_setzero_ps();
      off[t] = 0.f;
    }
    for (int64_t g = 0; g < G; ++g) {
      __m512i dot[T];
      for (int t = 0; t < T; ++t) dot[t] = _mm512_setzero_si512();
      for (int64_t k = g * group; k < (g + 1) * group; k += 64) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k / 2));
        const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_and_si256(v, mask));                     // k.., k+32..
        const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask));  // k+16.., k+48..
        for (int t = 0; t < T; ++t) {  // q in zmm order (zmm_order): columns k.., k+32.. then k+16.., k+48..
          const int16_t* qt = q + t * K + k;
          dot[t] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(dot[t], w0, _mm512_loadu_si512(qt)), w1,
                                       _mm512_loadu_si512(qt + 32));
        }
      }
      for (int t = 0; t < T; ++t) {
        const __m256i d = _mm256_add_epi32(_mm512_castsi512_si256(dot[t]), _mm512_extracti64x4_epi64(dot[t], 1));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s[g] * a[t * G + g]), acc[t]);
        if (mn) off[t] += mn[g] * aq[t * G + g];
      }
    }
    const float b = bias ? bias[n] : 0.f;
    for (int t = 0; t < T; ++t) y[t * N + n] = hsum(acc[t]) + off[t] + b;
  }
}

// q (T rows of K, K a multiple of 64) with the middle two 16-column chunks of every 64 swapped: the order in
// which q4_rows_zmm's widened codes hold the columns.
static std::vector<int16_t> zmm_order(const int16_t* q, int T, int64_t K) {
  std::vector<int16_t> out(static_cast<size_t>(T) * K);
  for (int64_t i = 0; i < T * K; i += 64) {
    std::memcpy(&out[i], q + i, 32);
    std::memcpy(&out[i + 16], q + i + 32, 32);
    std::memcpy(&out[i + 32], q + i + 16, 32);
    std::memcpy(&out[i + 48], q + i + 48, 32);
  }
  return out;
}
#endif

// affine_rows, or its 512-bit form where this build has one and the codes and group allow it (q then in
// zmm_order).
template <int T, class C>
static void affine_block(const C& c, const float* scale, const float* minv, int64_t K, int64_t group,
                         const int16_t* q, const float* a, const float* aq, const float* bias, float* y, int64_t N,
                         int64_t n0, int64_t n1) {
#ifdef LOWBIT_ZMM
  if constexpr (std::is_same_v<C, Nibbles>) {
    if (group % 64 == 0) return q4_rows_zmm<T>(c.codes, scale, minv, K, group, q, a, aq, bias, y, N, n0, n1);
  }
#endif
  affine_rows<T>(c, scale, minv, K, group, q, a, aq, bias, y, N, n0, n1);
}

// y[t, n] = wscale[n]·Σ_g a[t,g]·Σ_k w[n,k]·q[t,k] + bias[n], w signed int8.
template <int T>
static void q8_rows(const int8_t* w, const float* wscale, int64_t K, int64_t group, const int16_t* q,
                    const float* a, const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256i dot[T];
      for (int t = 0; t < T; ++t) dot[t] = _mm256_setzero_si256();
      for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16)));
        for (int t = 0; t < T; ++t) {
          const int16_t* qt = q + t * K + k;
          dot[t] = DOT(DOT(dot[t], w0, load16(qt)), w1, load16(qt + 16));
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

template <class C>
static void affine(int T, const C& c, const float* scale, const float* minv, int64_t K, int64_t group,
                   const int16_t* q, const float* a, const float* aq, const float* bias, float* y, int64_t N,
                   int64_t n0, int64_t n1) {
#ifdef LOWBIT_ZMM
  std::vector<int16_t> reordered;
  if constexpr (std::is_same_v<C, Nibbles>) {
    if (group % 64 == 0) {
      reordered = zmm_order(q, T, K);
      q = reordered.data();
    }
  }
#endif
  const int64_t G = K / group, rows = T > 4 ? std::max<int64_t>(4, kBlockBytes / c.row_bytes(K)) : n1 - n0;
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    const int64_t b1 = std::min(n1, b0 + rows);
    for (int t0 = 0; t0 < T; t0 += 4) {
      const int16_t* qt = q + t0 * K;
      const float *at = a + t0 * G, *aqt = aq + t0 * G;
      float* yt = y + t0 * N;
      switch (std::min(4, T - t0)) {
#define LOWBIT_CASE(t) case t: affine_block<t>(c, scale, minv, K, group, qt, at, aqt, bias, yt, N, b0, b1); break;
        LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
#undef LOWBIT_CASE
      }
    }
  }
}

static void q8(int T, const int8_t* w, const float* wscale, int64_t K, int64_t group, const int16_t* q,
               const float* a, const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / group, rows = T > 4 ? std::max<int64_t>(4, kBlockBytes / K) : n1 - n0;
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    const int64_t b1 = std::min(n1, b0 + rows);
    for (int t0 = 0; t0 < T; t0 += 4) {
      const int16_t* qt = q + t0 * K;
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

// W8A8: y[t, n] = (Σ_k q[t,k]·w[n,k])·s[t]·wscale[n] + bias[n], q the int8 activation codes, w the int8
// weight codes (both in [-127, 127]), the dot product exact in int32. The activations come as |q| (uint8)
// and q (int8): |q|·sign(w, q) = q·w per byte, so vpmaddubsw (pairs ≤ 2·127·127, no saturation) or
// vpdpbusd take them. K a multiple of 32.
template <int T>
static void a8_rows(const int8_t* w, const float* wscale, int64_t K, const uint8_t* qa, const int8_t* qs,
                    const float* s, const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    __m256i acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 32) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
      for (int t = 0; t < T; ++t) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa + t * K + k));
        const __m256i sg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + t * K + k));
        acc[t] = DOT8(acc[t], a, _mm256_sign_epi8(wv, sg));
      }
    }
    const float b = bias ? bias[n] : 0.f;
    for (int t = 0; t < T; ++t) {
      __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc[t]), _mm256_extracti128_si256(acc[t], 1));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
      v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
      y[t * N + n] = static_cast<float>(_mm_cvtsi128_si32(v)) * s[t] * wscale[n] + b;
    }
  }
}

static void a8(int T, const int8_t* w, const float* wscale, int64_t K, const uint8_t* qa, const int8_t* qs,
               const float* s, const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t rows = T > 4 ? std::max<int64_t>(4, kBlockBytes / K) : n1 - n0;
  for (int64_t b0 = n0; b0 < n1; b0 += rows) {
    const int64_t b1 = std::min(n1, b0 + rows);
    for (int t0 = 0; t0 < T; t0 += 4) {
      switch (std::min(4, T - t0)) {
#define LOWBIT_CASE(t) case t: a8_rows<t>(w, wscale, K, qa + t0 * K, qs + t0 * K, s + t0, bias, y + t0 * N, N, b0, b1); break;
        LOWBIT_CASE(1) LOWBIT_CASE(2) LOWBIT_CASE(3) LOWBIT_CASE(4)
#undef LOWBIT_CASE
      }
    }
  }
}

}  // namespace ISA_NS
