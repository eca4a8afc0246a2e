// int8 x int8 linear for x86 CPUs with AVX2 but without VNNI (raydist::int8_linear).
// Written by hand because fbgemm, PyTorch's int8 CPU path, sums u8 x s8 products in saturating int16 on such
// CPUs (8-bit activations overflow there; raydist then packed each weight as two codes, twice the bytes), and
// no library on PyPI offers an exact int8 GEMM with per-token activation scales for a handful of rows.
//
// y[m, n] = (amax_m / 127) * scale[n] * sum_k qa[m, k] * w[n, k]
// where qa = round(x * 127 / amax_m) in [-127, 127] (symmetric, per row), w is the int8 weight [N, K] (per output
// row scale). Pairs of products are summed in int16 (vpmaddubsw, which cannot saturate here, see tile) and then in
// int32: exact for any int8 values.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cctype>
#include <string>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

// Whether OpenMP's threads sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE), read once.
bool omp_threads_sleep() {
  static const bool passive = [] {
    const char* v = std::getenv("OMP_WAIT_POLICY");
    std::string s = v ? v : "";
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
    return s == "PASSIVE";
  }();
  return passive;
}

// The kernel's own threads, used where OpenMP's sleep. At batch 1 a decode step runs ~120 of these products, each a few tens of
// microseconds; OpenMP teams with OMP_WAIT_POLICY=PASSIVE (what Ray Serve replicas need, see serve/) put their
// threads to sleep between them and pay a wake-up per product. These workers spin for a short while after
// each product (SPIN), long enough to catch the next one of the same step, then sleep, so an idle server
// leaves the cores alone.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its threads live as long as the process
    return *pool;
  }

  // Run fn(t, n) for t in [0, n) on the caller (t = 0) and n - 1 workers; serial when another caller holds it.
  // spin: the workers wait for the next job for SPIN before they sleep (else they sleep at once).
  void run(int n, bool spin, const std::function<void(int, int)>& fn) {
    std::unique_lock<std::mutex> busy(run_lock_, std::try_to_lock);
    if (n <= 1 || !busy.owns_lock()) {
      fn(0, 1);
      return;
    }
    while (static_cast<int>(workers_.size()) < n - 1) {
      const int id = static_cast<int>(workers_.size()) + 1;
      const uint64_t now = gen_.load(std::memory_order_acquire);  // before the next job is posted
      workers_.emplace_back([this, id, now] { loop(id, now); });
      workers_.back().detach();
    }
    job_ = &fn;
    size_ = n;
    spin_ = spin;
    pending_.store(n - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(m_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    fn(0, n);
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
  }

 private:
  static constexpr auto SPIN = std::chrono::microseconds(200);

  void loop(int id, uint64_t seen) {
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      int spins = 0;
      const bool spin = spin_.load(std::memory_order_relaxed);
      while (gen_.load(std::memory_order_acquire) == seen) {
        _mm_pause();
        if (!spin || (++spins % 64 == 0 && std::chrono::steady_clock::now() - t0 > SPIN)) {
          std::unique_lock<std::mutex> lk(m_);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (id < size_) {
        (*job_)(id, size_);
        pending_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::mutex run_lock_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int, int)>* job_ = nullptr;
  int size_ = 1;
  std::atomic<bool> spin_{false};
  std::vector<std::thread> workers_;
};

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// The weight is packed once (raydist.compress.quant.native.pack_int8): rows padded to a multiple of 4, K to a
// multiple of 32, laid out [N/4, K/32, 4, 32] so that a block of 4 output rows is one contiguous stream.
constexpr int64_t NB = 4, KS = 32;

// MB activation rows (int8 codes, row stride lda) x one packed block of NB weight rows: y[i, j] for j < nb.
// 32 products per instruction without saturation: vpmaddubsw multiplies |w| (unsigned, <= 128) by the activation
// with w's sign (sign(a, w), within [-127, 127]) and adds neighbouring pairs in int16: |pair| <= 2 * 128 * 127 =
// 32512 < 32767, so every pair is exact; vpmaddwd by 1 widens the pairs to int32. On CPUs without VNNI this is
// twice the multiply throughput of widening to int16 first (measured on this box's Zen 3: 102 vs 51 GMAC/s a core).
template <int MB>
inline void tile(const int8_t* a, int64_t lda, const int8_t* wb, int64_t kp, const float* ascale,
                 const float* wscale, float* y, int64_t ldy, int64_t nb) {
  __m256i s[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) s[i][j] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < kp; k += KS, wb += KS * NB) {
    for (int j = 0; j < NB; ++j) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + KS * j));
      const __m256i aw = _mm256_abs_epi8(w);
      for (int i = 0; i < MB; ++i) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + k));
        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(av, w));
        s[i][j] = _mm256_add_epi32(s[i][j], _mm256_madd_epi16(p, ones));
      }
    }
  }
  int32_t r[MB][NB];  // constant bounds here keep s in registers (a runtime bound made GCC spill it every step)
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) r[i][j] = hsum(s[i][j]);
  for (int i = 0; i < MB; ++i)
    for (int64_t j = 0; j < nb; ++j) y[i * ldy + j] = float(r[i][j]) * ascale[i] * wscale[j];
}

inline float hmax(__m256 v) {
  float buf[8];
  _mm256_storeu_ps(buf, v);
  float m = 0.f;
  for (float x : buf) m = std::max(m, x);
  return m;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Activations: per-row symmetric int8 codes in [-127, 127] (K padded with zeros) and their scales. With a norm
// weight g, each row is first RMS-normalized as torch's rms_norm does (x * rsqrt(mean(x^2) + eps), then * g):
// fusing the norm into the product saves a separate op per linear (a large share of a batch-1 decode step).
void quantize_rows(const float* xp, int64_t M, int64_t K, int64_t kp, const float* g, float eps, int8_t* qa,
                   float* ascale) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the lane interleaving of the packs
  const __m256 sign = _mm256_set1_ps(-0.0f);
  std::vector<float> normed(g ? static_cast<size_t>(K) : 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xp + m * K;
    if (g) {
      __m256 ss = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(xr + k);
        ss = _mm256_fmadd_ps(v, v, ss);
      }
      float sum = hsum(ss);
      for (; k < K; ++k) sum += xr[k] * xr[k];
      const float r = 1.f / std::sqrt(sum / float(K) + eps);
      const __m256 vr = _mm256_set1_ps(r);
      k = 0;
      for (; k + 8 <= K; k += 8)
        _mm256_storeu_ps(normed.data() + k,
                         _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vr), _mm256_loadu_ps(g + k)));
      for (; k < K; ++k) normed[k] = (xr[k] * r) * g[k];
      xr = normed.data();
    }
    __m256 mx = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xr + k)));
    float amax = hmax(mx);
    for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
    amax = std::max(amax, 1e-12f);
    ascale[m] = amax / 127.f;
    const float inv = 127.f / amax;
    const __m256 vinv = _mm256_set1_ps(inv);
    int8_t* q = qa + m * kp;
    k = 0;
    for (; k + KS <= K; k += KS) {  // round half to even (the default MXCSR mode), like torch.round
      __m256i c[4];
      for (int h = 0; h < 4; ++h) c[h] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8 * h), vinv));
      const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_permutevar8x32_epi32(b, order));
    }
    for (; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(xr[k] * inv));
  }
}

// fn(t, n) for t in [0, n): on the kernel's own workers where OpenMP's sleep (spin: they wait a while for the next
// job first), else on OpenMP's team (its threads spin between regions; a second team would fight them).
void run_parallel(int n, bool spin, const std::function<void(int, int)>& fn) {
  if (n <= 1) {
    fn(0, 1);
  } else if (omp_threads_sleep()) {
    Pool::get().run(n, spin, fn);
  } else {
    at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) fn(static_cast<int>(t), n);
    });
  }
}

at::Tensor product(const at::Tensor& x_in, const float* g, double eps, const at::Tensor& w_in, const at::Tensor& s_in) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 4 && s_in.dim() == 1,
              "int8_linear: x [M, K], packed w [N/4, K/32, 4, 32], scale [N]");
  TORCH_CHECK(w_in.scalar_type() == at::kChar && w_in.size(2) == NB && w_in.size(3) == KS,
              "int8_linear: the weight must be int8 packed by pack_int8");
  TORCH_CHECK(w_in.size(1) * KS >= x_in.size(1) && w_in.size(1) * KS < x_in.size(1) + KS &&
                  w_in.size(0) * NB >= s_in.size(0) && w_in.size(0) * NB < s_in.size(0) + NB,
              "int8_linear: shapes do not match");
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(), "int8_linear: CPU tensors only");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor w = w_in.contiguous();
  const at::Tensor s = s_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = s.size(0), kp = w.size(1) * KS;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  std::vector<int8_t> qa(static_cast<size_t>(M * kp), 0);
  std::vector<float> ascale(static_cast<size_t>(M));
  const float* xp = x.data_ptr<float>();
  const int qthreads = M >= 16 ? std::min<int>(at::get_num_threads(), static_cast<int>(M / 8)) : 1;  // prefill
  run_parallel(qthreads, false, [&](int t, int n) {
    const int64_t m0 = M * t / n, m1 = M * (t + 1) / n;
    quantize_rows(xp + m0 * K, m1 - m0, K, kp, g, static_cast<float>(eps), qa.data() + m0 * kp, ascale.data() + m0);
  });

  const int8_t* a = qa.data();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nblocks = w.size(0);
  // Each task is a run of weight blocks against every activation row (each weight byte is read once).
  // Threads as torch.set_num_threads says; products too small to share run on the caller alone.
  const int threads = (M * N * kp < (1 << 16)) ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), nblocks));
  const auto part = [&](int t, int n) {
    const int64_t b0 = nblocks * t / n, b1 = nblocks * (t + 1) / n;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nb = std::min<int64_t>(NB, N - n0);
      const int8_t* wb = wp + b * kp * NB;
      int64_t m = 0;
      // 3 rows x 4 weight rows: 12 accumulators, the weight and |weight|, one temporary
      for (; m + 3 <= M; m += 3) tile<3>(a + m * kp, kp, wb, kp, ascale.data() + m, sp + n0, yp + m * N + n0, N, nb);
      if (M - m == 2) tile<2>(a + m * kp, kp, wb, kp, ascale.data() + m, sp + n0, yp + m * N + n0, N, nb);
      if (M - m == 1) tile<1>(a + m * kp, kp, wb, kp, ascale.data() + m, sp + n0, yp + m * N + n0, N, nb);
    }
  };
  run_parallel(threads, M <= 4, part);  // spin after small products only (decode at small batches)
  return y;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  return product(x, nullptr, 0.0, w, s);
}

// rms_norm(x, g, eps) then int8_linear, in one op.
at::Tensor int8_linear_rms(const at::Tensor& x, const at::Tensor& g_in, double eps, const at::Tensor& w,
                           const at::Tensor& s) {
  TORCH_CHECK(g_in.dim() == 1 && x.dim() == 2 && g_in.size(0) == x.size(1), "int8_linear_rms: norm weight [K]");
  const at::Tensor g = g_in.to(at::kFloat).contiguous();
  return product(x, g.data_ptr<float>(), eps, w, s);
}

}  // namespace

// The schema is defined in native.py (so TorchScript can name the op where this library is not built).
TORCH_LIBRARY_IMPL(raydist, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_linear_rms", &int8_linear_rms);
}
