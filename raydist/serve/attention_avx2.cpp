// Attention of one new token per sequence against its KV cache (raydist::decode_attention), AVX2.
// Written by hand because PyTorch's CPU scaled_dot_product_attention is built for long sequences: for one query
// token it took ~47 us a layer at batch 1 where this takes ~8 (SmolLM2-135M's 9 query / 3 KV heads of 64, 80
// cached positions, 2 cores, measured in-process); at batch 16 both are bound by reading the cache from memory.
//
// out[b, h] = sum_j softmax_j(scale * q[b, h] . k[b, g, j]) v[b, g, j] over the positions j < L with mask[b, j],
// where g = h / (nq / nkv) (grouped-query attention: each KV head serves nq / nkv query heads).
#include <ATen/ATen.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// exp on 8 floats (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp in float's range).
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 8 sums of 8 vectors, in order: [sum(a[0]), ..., sum(a[7])].
inline __m256 hsum8x8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);  // lanes: [0-3 low|0-3 high], ...
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// One query head: q [d], keys/values [L, d] (row stride d), valid [L]; writes out [d]. NC = d / 8 (the output
// stays in NC registers while the values are summed).
template <int NC>
void one_head(const float* q, const float* keys, const float* values, const bool* valid, int64_t L, float scale,
              float* scores, float* out) {
  constexpr int64_t d = 8 * NC;
  const float neg = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {  // 8 keys at a time, one horizontal reduction for all 8
    __m256 acc[8];
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    for (int c = 0; c < NC; ++c) {
      const __m256 qv = _mm256_loadu_ps(q + 8 * c);
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + (j + u) * d + 8 * c), acc[u]);
    }
    _mm256_storeu_ps(scores + j, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
  }
  for (; j < L; ++j) {
    __m256 acc = _mm256_setzero_ps();
    for (int c = 0; c < NC; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(keys + j * d + 8 * c), acc);
    scores[j] = hsum8(acc) * scale;
  }
  float mx = neg;
  for (j = 0; j < L; ++j) {
    if (!valid[j]) scores[j] = neg;
    mx = std::max(mx, scores[j]);
  }
  const __m256 vmx = _mm256_set1_ps(mx), vneg = _mm256_set1_ps(neg);
  __m256 vsum = _mm256_setzero_ps();
  j = 0;
  for (; j + 8 <= L; j += 8) {  // masked positions (-inf) get exactly 0
    const __m256 sc = _mm256_loadu_ps(scores + j);
    const __m256 pr = _mm256_and_ps(exp256(_mm256_sub_ps(sc, vmx)), _mm256_cmp_ps(sc, vneg, _CMP_GT_OQ));
    _mm256_storeu_ps(scores + j, pr);
    vsum = _mm256_add_ps(vsum, pr);
  }
  float sum = hsum8(vsum);
  for (; j < L; ++j) {
    scores[j] = std::exp(scores[j] - mx);
    sum += scores[j];
  }
  __m256 o[NC];
  for (int c = 0; c < NC; ++c) o[c] = _mm256_setzero_ps();
  for (j = 0; j < L; ++j) {
    if (scores[j] == 0.f) continue;
    const __m256 pr = _mm256_set1_ps(scores[j]);
    for (int c = 0; c < NC; ++c) o[c] = _mm256_fmadd_ps(pr, _mm256_loadu_ps(values + j * d + 8 * c), o[c]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(o[c], inv));
}

// q [B, nq, d]; k, v [B, nkv, capacity, d] (the KV cache buffers; the first L positions are used);
// mask [B, L] (true = attend). Returns [B, nq, d].
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 4 && v_in.dim() == 4 && mask_in.dim() == 2,
              "decode_attention: q [B, nq, d], k and v [B, nkv, capacity, d], mask [B, L]");
  TORCH_CHECK(k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "decode_attention: k and v must be float32");
  TORCH_CHECK(k_in.sizes() == v_in.sizes(), "decode_attention: k and v differ in shape");
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous();  // the cache's buffers already are
  const int64_t B = q_in.size(0), nq = q_in.size(1), d = q_in.size(2), nkv = k.size(1), cap = k.size(2);
  const int64_t L = mask_in.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(3) == d && mask_in.size(0) == B && L <= cap && L > 0,
              "decode_attention: shapes do not match");
  TORCH_CHECK(nq % nkv == 0 && (d == 16 || d == 32 || d == 64 || d == 128),
              "decode_attention: needs nq % nkv == 0 and head_dim 16, 32, 64 or 128");
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor mask = mask_in.to(at::kBool).contiguous();
  at::Tensor out = at::empty({B, nq, d}, q.options());
  const int64_t group = nq / nkv;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  // One thread: a decode step's attention is microseconds at batch 1 and bound by memory at batch 16; waking a
  // sleeping thread pool in a serving replica (OMP_WAIT_POLICY=PASSIVE, see compress/quant/native.py) costs more.
  std::vector<float> scores(static_cast<size_t>(L));
  for (int64_t t = 0; t < B * nq; ++t) {  // (row, query head) pairs
    const int64_t b = t / nq, h = t % nq, g = h / group;
    const int64_t kv = (b * nkv + g) * cap * d;
    const float* qh = qp + t * d;
    float* oh = op + t * d;
    const float sc = static_cast<float>(scale);
    switch (d) {
      case 16: one_head<2>(qh, kp + kv, vp + kv, mp + b * L, L, sc, scores.data(), oh); break;
      case 32: one_head<4>(qh, kp + kv, vp + kv, mp + b * L, L, sc, scores.data(), oh); break;
      case 64: one_head<8>(qh, kp + kv, vp + kv, mp + b * L, L, sc, scores.data(), oh); break;
      default: one_head<16>(qh, kp + kv, vp + kv, mp + b * L, L, sc, scores.data(), oh); break;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(raydist, CPU, m) { m.impl("decode_attention", &decode_attention); }
