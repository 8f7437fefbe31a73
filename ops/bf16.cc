// bfloat16 matrix products with float32 accumulation: the CPU kernels behind mindyouzhi.ops.bf16
// (MindSpore AOT custom ops, ops.Custom(..., func_type="aot")).
//
//   DenseBf16  inputs  x [..., K] float32, w [N, K] float32 (the checkpoint's (out, in) layout) or
//                      uint16 (w already rounded: bf16 bit patterns, see RoundToBf16)
//              output  y [..., N] float32 = x · wᵀ
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
// of the rows of x and calls the (sequential) GEMM on it.  CausalAttentionBf16: one task per
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

}  // namespace

// Exposed for the tests (ctypes): the rounding the kernel applies.
extern "C" void RoundToBf16(const float *source, int64_t count, uint16_t *target) { Round(source, count, target); }

extern "C" int DenseBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3) return 1;
  const bool packed = dtypes[1] != nullptr && std::string(dtypes[1]) == "uint16";
  if (!IsFloat32(dtypes[0]) || !IsFloat32(dtypes[2]) || !(packed || IsFloat32(dtypes[1]))) return 2;
  const int rank = ndims[0];
  if (rank < 1 || ndims[1] != 2 || ndims[2] != rank) return 3;
  const int64_t k = shapes[0][rank - 1], n = shapes[1][0];
  if (shapes[1][1] != k || shapes[2][rank - 1] != n) return 3;
  int64_t m = 1;
  for (int d = 0; d < rank - 1; ++d) {
    if (shapes[2][d] != shapes[0][d]) return 3;
    m *= shapes[0][d];
  }
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  if (m == 0 || n == 0) return 0;
  if (k == 0) {
    std::memset(y, 0, sizeof(float) * m * n);
    return 0;
  }
  std::vector<uint16_t> rounded(packed ? 0 : static_cast<size_t>(n * k));
  const uint16_t *w = packed ? static_cast<const uint16_t *>(params[1]) : rounded.data();
  const float *weight = static_cast<const float *>(params[1]);
  int failed = 0;
#pragma omp parallel reduction(| : failed)
  {
    if (!packed) {
#pragma omp for schedule(static)
      for (int64_t row = 0; row < n; ++row) Round(weight + row * k, k, rounded.data() + row * k);
    }
    int64_t threads = 1, id = 0;
#ifdef _OPENMP
    threads = omp_get_num_threads();
    id = omp_get_thread_num();
#endif
    const int64_t lo = m * id / threads, hi = m * (id + 1) / threads;
    if (hi > lo) {
      std::vector<uint16_t> rows(static_cast<size_t>((hi - lo) * k));
      Round(x + lo * k, (hi - lo) * k, rows.data());
      failed |= dnnl_gemm_bf16bf16f32('N', 'T', hi - lo, n, k, 1.0f, rows.data(), k, w, k, 0.0f, y + lo * n, n) != 0;
    }
  }
  return failed ? 5 : 0;
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
      float top = row[0];
      for (int64_t j = 1; j < seen; ++j) top = std::max(top, row[j]);
      for (int64_t j = 0; j < seen; ++j) row[j] = std::exp(row[j] - top);
      Round(row, seen, p);
      float total = 0.0f;  // the normaliser of the probabilities actually used: the rounded ones
      for (int64_t j = 0; j < seen; ++j) {
        const uint32_t bits = static_cast<uint32_t>(p[j]) << 16;
        float value;
        std::memcpy(&value, &bits, sizeof(value));
        total += value;
      }
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
