// bfloat16 matrix products with float32 accumulation: the CPU kernels behind mindyouzhi.ops.bf16
// (MindSpore AOT custom ops, ops.Custom(..., func_type="aot")).
//
//   DenseBf16  inputs  x [..., K] float32, w [N, K] float32 (the checkpoint's (out, in) layout) or
//                      uint16 (w already rounded: bf16 bit patterns, see RoundToBf16)
//              output  y [..., N] float32 = x · wᵀ
//
//   NormDenseBf16, SwigluDownBf16, DenseAddBf16  a decoder layer's RMSNorm + projections, its SwiGLU
//              MLP's activation + down projection + residual, and a projection + residual, each one
//              call (below; the serving engine's bf16 layer steps, where MindSpore's per-operator
//              cost outweighs the arithmetic)
//
//   CausalAttentionBf16  (prefill attention from position 0, every query row valid)
//              inputs  q [B, T, H, dk], k [B, T, G, dk], v [B, T, G, dv] float32 (the projections'
//                      own layout, before RoPE), cos/sin [T, R/2] float32, scale [1] float32
//              output  out [B, T, H, dv] float32 = softmax(rope(q)·rope(k)ᵀ·scale, causal) · v
//              RoPE (rotate-half pairing) turns the last R components of every q and k row; query
//              head h reads K/V group h / (H / G)
//
// The operands of every product are rounded to bfloat16 (round to nearest even, NaN kept NaN) and multiplied by
// oneDNN's gemm_bf16bf16f32 — the library MindSpore's own CPU kernels link, found next to
// libmindspore at build time — which accumulates in float32 (AVX512-BF16 dot products where the
// CPU has them).  That is the arithmetic of a bf16 forward on an accelerator: used for the
// calibration streams of the conversion, where it doubles the throughput of the fp32 GEMM and
// moves the statistics far less than their sampling noise (docs/BENCHMARKS.md).
//
// DenseBf16: the threads of an OpenMP team round a share of w each, then each rounds its own block
// of the rows of x and calls the (sequential) GEMM on it.  A decode-sized x (at most kFewRows rows)
// skips the GEMM, which repacks w on every call: each thread takes a share of the rows of w and
// dots it with every row of x (AVX512-BF16 dot products, float32 accumulators), reading w once.  CausalAttentionBf16: one task per
// (sequence, head) on the OpenMP threads; query rows go in blocks of kBlock, and a block's scores
// and probability-weighted values are two GEMMs over only the keys it can see (causal: about half
// the square); the softmax between them is exact float32 with the probabilities rounded to bf16
// for the second product and the normaliser taken from the rounded values.
// Return codes (non-zero = MindSpore raises): 1 bad arity, 2 bad dtype, 3 bad shape, 5 a GEMM
// failed (e.g. a CPU without AVX512).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

extern "C" int dnnl_gemm_bf16bf16f32(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha,
                                     const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb, float beta,
                                     float *c, int64_t ldc);

namespace {

inline uint16_t ToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

void Round(const float *source, int64_t count, uint16_t *target) {
  for (int64_t i = 0; i < count; ++i) target[i] = ToBf16(source[i]);
}

bool IsFloat32(const char *dtype) { return dtype != nullptr && std::string(dtype) == "float32"; }

inline float FromBf16(uint16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Up to this many rows of x, DenseBf16 computes dot products instead of calling the GEMM: oneDNN
// packs w on every call, which for a decode batch costs more than the products themselves.  So few
// rows are also rounded (and normed) on the calling thread: waking the OpenMP team costs more.
constexpr int64_t kFewRows = 16;
constexpr int64_t kRowGroup = 8;  // rows of x sharing one pass over a row of w

#ifdef __AVX512BF16__
// Rows rows of x against one row of w, the row count a compile-time constant so that the
// accumulators stay in registers (a runtime count spills them to the stack on every product,
// which halved the throughput of a decode step's products).
template <int Rows>
void DotRowGroup(const uint16_t *x, int64_t k, const uint16_t *w, float *y, int64_t ldy) {
  __m512 acc[Rows];
  for (int r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t at = 0; at < k; at += 32) {
    const __mmask32 lanes = k - at >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (k - at)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(lanes, w + at);
    for (int r = 0; r < Rows; ++r) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(lanes, x + r * k + at);
      acc[r] = _mm512_dpbf16_ps(acc[r], xv, wv);
    }
  }
  for (int r = 0; r < Rows; ++r) y[r * ldy] = _mm512_reduce_add_ps(acc[r]);
}
#endif

// y[r * ldy] = Σ_k x[r, k] · w[k] for the m rows of x (bf16 [m, k]) against one row w (bf16 [k]),
// products exact in float32, accumulated in float32.
void DotRows(const uint16_t *x, int64_t m, int64_t k, const uint16_t *w, float *y, int64_t ldy) {
  for (int64_t first = 0; first < m; first += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, m - first);
#ifdef __AVX512BF16__
    const uint16_t *group = x + first * k;
    float *out = y + first * ldy;
    switch (rows) {
      case 8: DotRowGroup<8>(group, k, w, out, ldy); break;
      case 7: DotRowGroup<7>(group, k, w, out, ldy); break;
      case 6: DotRowGroup<6>(group, k, w, out, ldy); break;
      case 5: DotRowGroup<5>(group, k, w, out, ldy); break;
      case 4: DotRowGroup<4>(group, k, w, out, ldy); break;
      case 3: DotRowGroup<3>(group, k, w, out, ldy); break;
      case 2: DotRowGroup<2>(group, k, w, out, ldy); break;
      default: DotRowGroup<1>(group, k, w, out, ldy); break;
    }
#else
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t *xr = x + (first + r) * k;
      float total = 0.0f;
      for (int64_t j = 0; j < k; ++j) total += FromBf16(xr[j]) * FromBf16(w[j]);
      y[(first + r) * ldy] = total;
    }
#endif
  }
}

}  // namespace

// Exposed for the tests (ctypes): the rounding the kernel applies.
extern "C" void RoundToBf16(const float *source, int64_t count, uint16_t *target) { Round(source, count, target); }

namespace {

// y [m, n] = x · wᵀ for x already in bf16 ([m, k]) and w packed ([n, k]), on the OpenMP team: few
// rows as dot products over a share of w per thread, more as one GEMM per thread's block of rows.
int MultiplyRounded(const uint16_t *x, int64_t m, int64_t k, const uint16_t *w, int64_t n, float *y) {
  if (m <= kFewRows) {
#pragma omp parallel for schedule(static)
    for (int64_t out = 0; out < n; ++out) DotRows(x, m, k, w + out * k, y + out, n);
    return 0;
  }
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    int64_t threads = 1, id = 0;
#ifdef _OPENMP
    threads = omp_get_num_threads();
    id = omp_get_thread_num();
#endif
    const int64_t lo = m * id / threads, hi = m * (id + 1) / threads;
    if (hi > lo)
      failed |= dnnl_gemm_bf16bf16f32('N', 'T', hi - lo, n, k, 1.0f, x + lo * k, k, w, k, 0.0f, y + lo * n, n) != 0;
  }
  return failed ? 5 : 0;
}

// The leading dimensions of a [..., last] tensor multiplied out (rows), or -1 if `other` differs in them.
int64_t Rows(int rank, const int64_t *shape, int other_rank, const int64_t *other) {
  if (rank < 1 || other_rank != rank) return -1;
  int64_t rows = 1;
  for (int d = 0; d < rank - 1; ++d) {
    if (shape[d] != other[d]) return -1;
    rows *= shape[d];
  }
  return rows;
}

}  // namespace

extern "C" int DenseBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3) return 1;
  const bool packed = dtypes[1] != nullptr && std::string(dtypes[1]) == "uint16";
  if (!IsFloat32(dtypes[0]) || !IsFloat32(dtypes[2]) || !(packed || IsFloat32(dtypes[1]))) return 2;
  const int rank = ndims[0];
  if (rank < 1 || ndims[1] != 2) return 3;
  const int64_t k = shapes[0][rank - 1], n = shapes[1][0], m = Rows(rank, shapes[0], ndims[2], shapes[2]);
  if (m < 0 || shapes[1][1] != k || shapes[2][rank - 1] != n) return 3;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  if (m == 0 || n == 0) return 0;
  if (k == 0) {
    std::memset(y, 0, sizeof(float) * m * n);
    return 0;
  }
  std::vector<uint16_t> rounded(packed ? 0 : static_cast<size_t>(n * k));
  if (!packed) {
    const float *weight = static_cast<const float *>(params[1]);
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < n; ++row) Round(weight + row * k, k, rounded.data() + row * k);
  }
  std::vector<uint16_t> rows(static_cast<size_t>(m * k));
#pragma omp parallel for schedule(static) if (m > kFewRows)
  for (int64_t row = 0; row < m; ++row) Round(x + row * k, k, rows.data() + row * k);
  return MultiplyRounded(rows.data(), m, k, packed ? static_cast<const uint16_t *>(params[1]) : rounded.data(), n, y);
}

// NormDenseBf16  inputs  x [..., K] float32, g [K] float32, w [N, K] uint16 (packed), eps [1] float32
//                output  y [..., N] float32 = (x / rms(x) · g) · wᵀ, the norm in float32 (RMSNorm), its
//                        result rounded to bf16 for the product: a layer's input norm and its
//                        projections (or the final norm and the LM head) as one call.
extern "C" int NormDenseBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5) return 1;
  if (!IsFloat32(dtypes[0]) || !IsFloat32(dtypes[1]) || std::string(dtypes[2]) != "uint16" || !IsFloat32(dtypes[3]) ||
      !IsFloat32(dtypes[4]))
    return 2;
  const int rank = ndims[0];
  if (rank < 1 || ndims[1] != 1 || ndims[2] != 2 || ndims[3] != 1 || shapes[3][0] != 1) return 3;
  const int64_t k = shapes[0][rank - 1], n = shapes[2][0], m = Rows(rank, shapes[0], ndims[4], shapes[4]);
  if (m < 0 || shapes[1][0] != k || shapes[2][1] != k || shapes[4][rank - 1] != n || k == 0) return 3;
  const float *x = static_cast<const float *>(params[0]);
  const float *g = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[3]);
  if (m == 0 || n == 0) return 0;
  std::vector<uint16_t> rows(static_cast<size_t>(m * k));
#pragma omp parallel if (m > kFewRows)
  {
    std::vector<float> normed(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < m; ++row) {
      const float *source = x + row * k;
      float squares = 0.0f;
      for (int64_t j = 0; j < k; ++j) squares += source[j] * source[j];
      const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(k) + eps);
      for (int64_t j = 0; j < k; ++j) normed[j] = source[j] * inverse * g[j];
      Round(normed.data(), k, rows.data() + row * k);
    }
  }
  return MultiplyRounded(rows.data(), m, k, static_cast<const uint16_t *>(params[2]), n, static_cast<float *>(params[4]));
}

// SwigluDownBf16  inputs  h [..., D] float32, gu [..., 2F] float32 (gate | up), w [D, F] uint16 (packed)
//                 output  y [..., D] float32 = h + (silu(gate) · up) · wᵀ, the activation in float32,
//                         rounded to bf16 for the product: a SwiGLU MLP's second half and the residual.
extern "C" int SwigluDownBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;
  if (!IsFloat32(dtypes[0]) || !IsFloat32(dtypes[1]) || std::string(dtypes[2]) != "uint16" || !IsFloat32(dtypes[3]))
    return 2;
  const int rank = ndims[0];
  if (rank < 1 || ndims[2] != 2) return 3;
  const int64_t d = shapes[0][rank - 1], f = shapes[2][1], m = Rows(rank, shapes[0], ndims[1], shapes[1]);
  if (m < 0 || Rows(rank, shapes[0], ndims[3], shapes[3]) != m || shapes[1][rank - 1] != 2 * f ||
      shapes[2][0] != d || shapes[3][rank - 1] != d || f == 0)
    return 3;
  const float *h = static_cast<const float *>(params[0]);
  const float *gu = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[3]);
  if (m == 0 || d == 0) return 0;
  std::vector<uint16_t> rows(static_cast<size_t>(m * f));
#pragma omp parallel
  {
    std::vector<float> act(static_cast<size_t>(f));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < m; ++row) {
      const float *gate = gu + row * 2 * f, *up = gate + f;
      for (int64_t j = 0; j < f; ++j) act[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];
      Round(act.data(), f, rows.data() + row * f);
    }
  }
  const int status = MultiplyRounded(rows.data(), m, f, static_cast<const uint16_t *>(params[2]), d, y);
  if (status != 0) return status;
  for (int64_t i = 0; i < m * d; ++i) y[i] += h[i];
  return 0;
}

// DenseAddBf16  inputs  x [..., K] float32, w [N, K] uint16 (packed), r [..., N] float32
//               output  y [..., N] float32 = r + x · wᵀ: a projection and the residual it feeds (the
//                       attention output projection of a decode layer step) as one call.
extern "C" int DenseAddBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                            void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;
  if (!IsFloat32(dtypes[0]) || std::string(dtypes[1]) != "uint16" || !IsFloat32(dtypes[2]) || !IsFloat32(dtypes[3]))
    return 2;
  const int rank = ndims[0];
  if (rank < 1 || ndims[1] != 2) return 3;
  const int64_t k = shapes[0][rank - 1], n = shapes[1][0], m = Rows(rank, shapes[0], ndims[3], shapes[3]);
  if (m < 0 || Rows(rank, shapes[0], ndims[2], shapes[2]) != m || shapes[1][1] != k || shapes[2][rank - 1] != n ||
      shapes[3][rank - 1] != n)
    return 3;
  const float *x = static_cast<const float *>(params[0]);
  const float *residual = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  if (m == 0 || n == 0) return 0;
  if (k == 0) {
    std::memcpy(y, residual, sizeof(float) * m * n);
    return 0;
  }
  std::vector<uint16_t> rows(static_cast<size_t>(m * k));
#pragma omp parallel for schedule(static) if (m > kFewRows)
  for (int64_t row = 0; row < m; ++row) Round(x + row * k, k, rows.data() + row * k);
  const int status = MultiplyRounded(rows.data(), m, k, static_cast<const uint16_t *>(params[1]), n, y);
  if (status != 0) return status;
  for (int64_t i = 0; i < m * n; ++i) y[i] += residual[i];
  return 0;
}

namespace {

constexpr int64_t kBlock = 64;  // query rows per pair of GEMMs

// Rows [T, width] of one head, `stride` floats apart, into bf16 [T, width]; the last 2·half
// components turned by RoPE with cos/sin [T, half] (half = 0: no rotation).
void GatherRows(const float *source, int64_t t, int64_t width, int64_t stride, const float *cos, const float *sin,
                int64_t half, std::vector<float> &row, uint16_t *target) {
  const int64_t plain = width - 2 * half;
  for (int64_t i = 0; i < t; ++i) {
    const float *x = source + i * stride;
    std::memcpy(row.data(), x, sizeof(float) * plain);
    const float *c = cos + i * half, *s = sin + i * half, *x1 = x + plain, *x2 = x + plain + half;
    for (int64_t j = 0; j < half; ++j) {
      row[plain + j] = x1[j] * c[j] - x2[j] * s[j];
      row[plain + half + j] = x2[j] * c[j] + x1[j] * s[j];
    }
    Round(row.data(), width, target + i * width);
  }
}

// p[j] = bf16(exp(row[j] - max(row))) for j < n; returns Σ p[j] (as float32).  The rounding is
// ToBf16's; with AVX512 the exponential is a degree-6 polynomial after range reduction (Cephes'
// expf: relative error below 2e-7, far under the bf16 rounding that follows) — std::exp one value
// at a time made the softmax cost more than both GEMMs of the attention.
float Exponentials(const float *row, int64_t n, uint16_t *p) {
#ifdef __AVX512F__
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    top = _mm512_mask_max_ps(top, lanes, top, _mm512_maskz_loadu_ps(lanes, row + j));
  }
  const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, row + j), peak), _mm512_set1_ps(-104.0f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 poly = _mm512_set1_ps(1.9875691500e-4f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.3981999507e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
    poly = _mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512 value = _mm512_scalef_ps(poly, k);  // · 2^k
    // ToBf16 in 16 lanes (no NaN can reach here: the scores are finite or the max is NaN-free)
    __m512i bits = _mm512_castps_si512(value);
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                   _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1))));
    bits = _mm512_srli_epi32(bits, 16);
    _mm256_mask_storeu_epi16(p + j, lanes, _mm512_cvtepi32_epi16(bits));
    total = _mm512_mask_add_ps(total, lanes, total, _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)));
  }
  return _mm512_reduce_add_ps(total);
#else
  float top = row[0];
  for (int64_t j = 1; j < n; ++j) top = std::max(top, row[j]);
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = ToBf16(std::exp(row[j] - top));
    total += FromBf16(p[j]);
  }
  return total;
#endif
}

struct Head {
  const float *q, *k, *v;            // row 0 of this head / group
  int64_t q_stride, k_stride, v_stride;  // floats between consecutive positions
  const float *cos, *sin;
  int64_t half;
  float *out;
  int64_t out_stride;
};

struct Buffers {
  std::vector<uint16_t> q, k, v, probs;
  std::vector<float> scores, row, norm;
};

int AttendHead(const Head &head, int64_t t, int64_t dk, int64_t dv, float scale, Buffers &buf) {
  GatherRows(head.q, t, dk, head.q_stride, head.cos, head.sin, head.half, buf.row, buf.q.data());
  GatherRows(head.k, t, dk, head.k_stride, head.cos, head.sin, head.half, buf.row, buf.k.data());
  GatherRows(head.v, t, dv, head.v_stride, head.cos, head.sin, 0, buf.row, buf.v.data());
  for (int64_t begin = 0; begin < t; begin += kBlock) {
    const int64_t rows = std::min(kBlock, t - begin), keys = begin + rows;
    if (dnnl_gemm_bf16bf16f32('N', 'T', rows, keys, dk, scale, buf.q.data() + begin * dk, dk, buf.k.data(), dk, 0.0f,
                              buf.scores.data(), keys) != 0)
      return 5;
    for (int64_t r = 0; r < rows; ++r) {
      float *row = buf.scores.data() + r * keys;
      uint16_t *p = buf.probs.data() + r * keys;
      const int64_t seen = begin + r + 1;
      const float total = Exponentials(row, seen, p);  // the normaliser of the rounded probabilities
      std::fill(p + seen, p + keys, static_cast<uint16_t>(0));
      buf.norm[r] = 1.0f / total;
    }
    float *target = head.out + begin * head.out_stride;
    if (dnnl_gemm_bf16bf16f32('N', 'N', rows, dv, keys, 1.0f, buf.probs.data(), keys, buf.v.data(), dv, 0.0f, target,
                              head.out_stride) != 0)
      return 5;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < dv; ++c) target[r * head.out_stride + c] *= buf.norm[r];
  }
  return 0;
}

}  // namespace

extern "C" int CausalAttentionBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 7) return 1;
  for (int i = 0; i < 7; ++i)
    if (!IsFloat32(dtypes[i])) return 2;
  const int want_ndims[7] = {4, 4, 4, 2, 2, 1, 4};
  for (int i = 0; i < 7; ++i)
    if (ndims[i] != want_ndims[i]) return 3;
  const int64_t batch = shapes[0][0], t = shapes[0][1], heads = shapes[0][2], dk = shapes[0][3];
  const int64_t groups = shapes[1][2], dv = shapes[2][3], half = shapes[3][1];
  if (groups <= 0 || heads % groups != 0 || 2 * half > dk || shapes[1][0] != batch || shapes[1][1] != t ||
      shapes[1][3] != dk || shapes[2][0] != batch || shapes[2][1] != t || shapes[2][2] != groups ||
      shapes[3][0] != t || shapes[4][0] != t || shapes[4][1] != half || shapes[5][0] != 1 || shapes[6][0] != batch ||
      shapes[6][1] != t || shapes[6][2] != heads || shapes[6][3] != dv)
    return 3;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *cos = static_cast<const float *>(params[3]);
  const float *sin = static_cast<const float *>(params[4]);
  const float scale = *static_cast<const float *>(params[5]);
  float *out = static_cast<float *>(params[6]);
  if (batch == 0 || heads == 0 || t == 0 || dv == 0) return 0;
  const int64_t per_group = heads / groups, tasks = batch * heads;
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    const int64_t block = std::min(kBlock, t);
    Buffers buf{std::vector<uint16_t>(t * dk), std::vector<uint16_t>(t * dk), std::vector<uint16_t>(t * dv),
                std::vector<uint16_t>(block * t), std::vector<float>(block * t),
                std::vector<float>(std::max(dk, dv)), std::vector<float>(block)};
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / heads, h = task % heads, g = h / per_group;
      const Head head{q + (b * t * heads + h) * dk, k + (b * t * groups + g) * dk, v + (b * t * groups + g) * dv,
                      heads * dk, groups * dk, groups * dv, cos, sin, half, out + (b * t * heads + h) * dv,
                      heads * dv};
      failed |= AttendHead(head, t, dk, dv, scale, buf);
    }
  }
  return failed ? 5 : 0;
}
