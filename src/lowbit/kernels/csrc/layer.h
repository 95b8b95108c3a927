// One decoder layer of a Llama-family model for one token, in one call (lowbit.runtime's decode step):
// RMSNorm → q|k|v GEMV → rotary embedding on q and k → K/V written into the cache → attention over the
// cache → o GEMV → residual → RMSNorm → gate|up GEMV → SiLU(gate)·up → down GEMV → residual.
// Every matrix product is this file's includer's int4 / int8 / int8-code-group GEMV (the same arithmetic as
// q4_gemv, q8_gemv and g8_gemv: int16 activations per group); where a GEMV's input holds a value above `limit` (or inf/NaN) that
// product is computed in float32 from the dequantized weight instead (the reference's arithmetic).
// Included by gemv.cpp inside its anonymous namespace, after the GEMVs.

// A linear layer's packed state as lowbit.kernels.int4_cpp / int8_cpp hold it.
struct Lin {
  int64_t kind;  // 0: int4 groups (codes, scale, minv), 1: int8 per channel (codes, scale), 2: W8A8 (codes,
                 // scale, the static activation scale or none: per token), 3: int8-code groups (codes, scale, minv)
  int64_t group, isa, N, K;
  const uint8_t* c4 = nullptr;
  const int8_t* c8 = nullptr;
  const float *scale = nullptr, *minv = nullptr, *bias = nullptr;
  float act_scale = 0.f;  // kind 2: > 0 static, else dynamic per token
};

Lin make_lin(const std::vector<torch::Tensor>& t, const std::vector<int64_t>& meta, size_t i, int64_t K) {
  Lin l;
  l.kind = meta[3 * i];
  l.group = meta[3 * i + 1];
  l.isa = meta[3 * i + 2];
  l.K = K;
  const torch::Tensor &codes = t[4 * i], &scale = t[4 * i + 1], &minv = t[4 * i + 2], &bias = t[4 * i + 3];
  TORCH_CHECK(l.kind >= 0 && l.kind <= 3, "layer_step: linear ", i, ": unknown kind ", l.kind);
  TORCH_CHECK(supported(l.isa), "layer_step: this CPU lacks instruction set ", l.isa);
  TORCH_CHECK(l.group > 0 && l.group % (l.kind == 3 ? 16 : 32) == 0 && K % l.group == 0, "layer_step: linear ", i,
              ": bad group");
  if (l.kind == 2 && minv.numel()) {
    TORCH_CHECK(minv.scalar_type() == torch::kFloat32 && minv.numel() == 1, "layer_step: linear ", i,
                ": the static activation scale must be one float32");
    l.act_scale = minv.data_ptr<float>()[0];
  }
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 2, "layer_step: linear ", i, ": codes (out, …) contiguous");
  l.N = codes.size(0);
  const int64_t G = K / l.group;
  if (l.kind == 0) {
    TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.size(1) == K / 2, "layer_step: linear ", i,
                ": int4 codes must be uint8 (out, in / 2)");
    l.minv = check_group_params(scale, minv, l.N, G, "layer_step");
    l.c4 = codes.data_ptr<uint8_t>();
  } else if (l.kind == 3) {
    TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.size(1) == K, "layer_step: linear ", i,
                ": int8-code groups must be int8 (out, in)");
    l.minv = check_group_params(scale, minv, l.N, G, "layer_step");
    l.c8 = codes.data_ptr<int8_t>();
  } else {  // int8 codes per channel: weight-only (1) or W8A8 (2)
    TORCH_CHECK(codes.scalar_type() == torch::kInt8 && codes.size(1) == K, "layer_step: linear ", i,
                ": int8 codes must be int8 (out, in)");
    TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == l.N,
                "layer_step: linear ", i, ": scale must be float32 (out,)");
    l.c8 = codes.data_ptr<int8_t>();
  }
  l.scale = scale.data_ptr<float>();
  if (bias.numel()) {
    TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == l.N,
                "layer_step: linear ", i, ": bias must be float32 (out,)");
    l.bias = bias.data_ptr<float>();
  }
  return l;
}

// y (N) = W x (K) + b for one token: the GEMV, or float32 from the dequantized weight when max|x| > limit
// (weight-only kinds) or x holds inf / NaN (W8A8).
void lin_apply(const Lin& l, const float* x, float* y, double limit) {
  const int64_t K = l.K, N = l.N, G = K / l.group;
  if (l.kind == 2) {  // W8A8: the model's own int8 activations
    std::vector<uint8_t> qa(K);
    std::vector<int8_t> qs(K);
    float s;
    if (quantize_a8(x, K, l.act_scale, qa.data(), qs.data(), &s)) {
      a8_into(1, l.isa, l.c8, l.scale, K, qa.data(), qs.data(), &s, l.bias, y, N);
      return;
    }
  }
  const Rows r(x, 1, K, G, l.group, l.isa);
  if (l.kind == 2 || !(r.top <= limit)) {  // rare: the exact float32 product, row by row
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          float w;
          if (l.kind == 0) {
            const int64_t blk = k / 32, j = k % 32;
            const uint8_t byte = l.c4[n * (K / 2) + blk * 16 + (j % 16)];
            const int code = j < 16 ? (byte & 0x0F) : (byte >> 4);
            const int64_t g = k / l.group;
            w = float(code) * l.scale[n * G + g] + (l.minv ? l.minv[n * G + g] : 0.f);
          } else if (l.kind == 3) {
            const int64_t g = k / l.group;
            w = float(l.c8[n * K + k]) * l.scale[n * G + g] + (l.minv ? l.minv[n * G + g] : 0.f);
          } else {
            w = float(l.c8[n * K + k]) * l.scale[n];
          }
          s += w * x[k];
        }
        y[n] = s + (l.bias ? l.bias[n] : 0.f);
      }
    });
    return;
  }
  if (l.kind == 0)
    q4_into(1, l.isa, l.c4, l.scale, l.minv, K, l.group, r, l.bias, y, N);
  else if (l.kind == 3)
    g8_into(1, l.isa, l.c8, l.scale, l.minv, K, l.group, r, l.bias, y, N);
  else
    q8_into(1, l.isa, l.c8, l.scale, K, l.group, r, l.bias, y, N);
}

// out = x · rsqrt(mean(x²) + eps) · w, in float32 (transformers' LlamaRMSNorm).
void rms_norm(const float* x, const float* w, int64_t H, double eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < H; ++i) ss += double(x[i]) * x[i];
  const float r = 1.f / std::sqrt(float(ss / double(H)) + float(eps));
  for (int64_t i = 0; i < H; ++i) out[i] = w[i] * (x[i] * r);
}

// Σ a[e]·b[e] and out[e] += w·v[e] over n elements (AVX2 + FMA: the library only loads on such CPUs).
__attribute__((target("avx2,fma"))) float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 8 <= n; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), _mm256_loadu_ps(b + e), acc);
  float s = avx2::hsum(acc);
  for (; e < n; ++e) s += a[e] * b[e];
  return s;
}

__attribute__((target("avx2,fma"))) void axpy_f32(float w, const float* v, float* out, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    _mm256_storeu_ps(out + e, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + e), _mm256_loadu_ps(out + e)));
  for (; e < n; ++e) out[e] += w * v[e];
}

// x·cos + rotate_half(x)·sin on one head (rotate_half(x) = cat(−x₂, x₁)), written x·cos + roll(x, d/2)·sin'
// with sin' = sin with its first half negated (what lowbit.runtime passes).
void rope(float* x, const float* cos, const float* sin_signed, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] + b * sin_signed[i];
    x[i + h] = b * cos[i + h] + a * sin_signed[i + h];
  }
}

// x (1, H) float32, updated in place and returned: one decoder layer for the token at position `pos`;
// kc, vc (1, nkv, cap, hd) float32 caches (positions < pos filled), cos, sin' (hd) for this position.
// lin: 4 tensors per linear (codes, scale, minv or empty, bias or empty) for qkv, o, gate|up, down;
// meta: (kind, group, isa) per linear.
torch::Tensor layer_step(torch::Tensor x, const torch::Tensor& ln1, double eps1, const torch::Tensor& ln2,
                         double eps2, const std::vector<torch::Tensor>& lin, const std::vector<int64_t>& meta,
                         torch::Tensor kc, torch::Tensor vc, int64_t pos, const torch::Tensor& cos,
                         const torch::Tensor& sin, int64_t nh, int64_t nkv, int64_t hd, double scaling,
                         int64_t inter, double limit) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.numel() == x.size(-1),
              "layer_step: x must be one contiguous float32 token (…, hidden)");
  const int64_t H = x.size(-1);
  TORCH_CHECK(lin.size() == 16 && meta.size() == 12, "layer_step: 4 linears (qkv, o, gate|up, down)");
  TORCH_CHECK(nh > 0 && nkv > 0 && nh % nkv == 0 && hd > 0 && hd % 2 == 0, "layer_step: bad head counts");
  for (const auto* p : {&kc, &vc})
    TORCH_CHECK(p->scalar_type() == torch::kFloat32 && p->is_contiguous() && p->dim() == 4 && p->size(0) == 1 &&
                    p->size(1) == nkv && p->size(3) == hd && pos >= 0 && pos < p->size(2),
                "layer_step: caches must be contiguous float32 (1, kv heads, capacity > pos, head_dim)");
  for (const auto* p : {&ln1, &ln2})
    TORCH_CHECK(p->scalar_type() == torch::kFloat32 && p->is_contiguous() && p->numel() == H,
                "layer_step: norm weights must be float32 (hidden,)");
  for (const auto* p : {&cos, &sin})
    TORCH_CHECK(p->scalar_type() == torch::kFloat32 && p->is_contiguous() && p->numel() == hd,
                "layer_step: cos / sin must be float32 (head_dim,)");
  const int64_t QKV = (nh + 2 * nkv) * hd;
  const Lin qkv = make_lin(lin, meta, 0, H), o = make_lin(lin, meta, 1, nh * hd),
            gu = make_lin(lin, meta, 2, H), down = make_lin(lin, meta, 3, inter);
  TORCH_CHECK(qkv.N == QKV && o.N == H && gu.N == 2 * inter && down.N == H,
              "layer_step: linear shapes do not match the heads and sizes");
  float* xp = x.data_ptr<float>();
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  std::vector<float> h(std::max(H, inter)), y(std::max(QKV, 2 * inter)), att(nh * hd), d(H);
  // attention
  rms_norm(xp, ln1.data_ptr<float>(), H, eps1, h.data());
  lin_apply(qkv, h.data(), y.data(), limit);
  for (int64_t i = 0; i < nh + nkv; ++i) rope(y.data() + i * hd, c, s, hd);
  const int64_t cap = kc.size(2), L = pos + 1, rep = nh / nkv;
  float *K = kc.data_ptr<float>(), *V = vc.data_ptr<float>();
  for (int64_t g = 0; g < nkv; ++g) {
    std::memcpy(K + (g * cap + pos) * hd, y.data() + (nh + g) * hd, hd * sizeof(float));
    std::memcpy(V + (g * cap + pos) * hd, y.data() + (nh + nkv + g) * hd, hd * sizeof(float));
  }
  at::parallel_for(0, nh, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(L);
    for (int64_t head = h0; head < h1; ++head) {
      const int64_t g = head / rep;
      const float* qh = y.data() + head * hd;
      const float* Kg = K + g * cap * hd;
      const float* Vg = V + g * cap * hd;
      float top = -INFINITY;
      for (int64_t j = 0; j < L; ++j) {
        p[j] = dot_f32(qh, Kg + j * hd, hd) * float(scaling);
        top = std::max(top, p[j]);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < L; ++j) {
        p[j] = std::exp(p[j] - top);
        sum += p[j];
      }
      float* out = att.data() + head * hd;
      std::fill(out, out + hd, 0.f);
      for (int64_t j = 0; j < L; ++j) {
        axpy_f32(p[j] / sum, Vg + j * hd, out, hd);
      }
    }
  });
  lin_apply(o, att.data(), d.data(), limit);
  for (int64_t i = 0; i < H; ++i) xp[i] += d[i];
  // MLP
  rms_norm(xp, ln2.data_ptr<float>(), H, eps2, h.data());
  lin_apply(gu, h.data(), y.data(), limit);
  for (int64_t i = 0; i < inter; ++i) {
    const float g = y[i];
    h[i] = g / (1.f + std::exp(-g)) * y[inter + i];
  }
  lin_apply(down, h.data(), d.data(), limit);
  for (int64_t i = 0; i < H; ++i) xp[i] += d[i];
  return x;
}
