// Decode attention over a paged KV cache: the CPU kernels behind mindyouzhi.ops.paged_attention.
//
// Two MindSpore AOT entry points (ops.Custom(..., func_type="aot")), both for one query token per
// sequence (the decode step):
//
//   PagedMlaDecode  absorbed Multi-head Latent Attention over the latent cache
//       inputs  q_latent [B, H, r]    query already absorbed through W_UK
//               q_pe     [B, H, dr]   RoPE'd query part
//               latent   [N, S, r]    latent pool (N blocks of S tokens)
//               k_pe     [N, S, dr]   RoPE'd shared key pool
//               tables   [B, M] int32 block table per sequence
//               lens     [B]    int32 tokens of each sequence in the pool (0 = padding row)
//               scale    [1]          softmax scale
//       output  out      [B, H, r]    softmax(q·kᵀ·scale) · latent, to be expanded through W_UV
//
//   PagedGqaDecode  grouped-query attention over a K/V pool (the unconverted layers, and the GQA
//                   baseline of bench/decode.py)
//       inputs  q [B, H, d], k [N, S, KV, d], v [N, S, KV, d], tables, lens, scale
//       output  out [B, H, d]
//
// One task handles all the heads of a (sequence, KV group) in a single pass over its blocks: a
// block's rows are contiguous, come from memory once and are read by every head from L1 — the
// reuse that lets MLA, whose single latent row serves all H heads, move 3x fewer bytes per token
// than GQA on SmolLM2.  Tasks are spread over OpenMP threads.  The
// arithmetic uses 16-lane GCC/Clang vector types (split by the compiler on narrower ISAs), so the
// dot products keep their partial sums in registers instead of reducing lane by lane.
// Return codes (non-zero = MindSpore raises): 1 bad arity, 2 bad dtype, 3 bad shape, 4 block id
// or length out of range.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t LaneIndex __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float *p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float *p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

template <int... I>
inline Vec Permute(Vec v) {
#if defined(__clang__)
  return __builtin_shufflevector(v, v, I...);
#else
  return __builtin_shuffle(v, LaneIndex{I...});
#endif
}

// Halving tree in registers: 4 permutes and adds.
inline float Sum(Vec v) {
  v += Permute<8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7>(v);
  v += Permute<4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11>(v);
  v += Permute<2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13>(v);
  v += Permute<1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14>(v);
  return v[0];
}

inline float Dot(const float *a, const float *b, int64_t n) {
  Vec acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += Load(a + i) * Load(b + i);
  float sum = Sum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// e^x for the softmax numerators (x <= 0), branch-free so the loop around it vectorises: libm's
// expf is a scalar call.  Range reduction x = k·ln2 + r (|r| <= ln2/2, ln2 split in two for
// exactness) and a degree-6 Taylor polynomial: relative error ~1e-7, the float rounding level.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.0f);  // keeps 2^k a normal float; e^-87 is 0 next to the max's e^0 = 1
  const float k = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

bool IsDtype(const char *dtype, const char *expected) { return std::string(dtype) == expected; }

int ThreadCount() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

struct Paged {
  const int32_t *tables;
  const int32_t *lens;
  int64_t batch, max_blocks, num_blocks, block_size;
};

// Lengths must fit the block table; checked before any thread starts.
bool LengthsFit(const Paged &paged) {
  for (int64_t b = 0; b < paged.batch; ++b) {
    if (paged.lens[b] < 0 || paged.lens[b] > paged.max_blocks * paged.block_size) return false;
  }
  return true;
}

// What a group of query heads attends to.  Row i of the cache (block * S + slot) has a key made of
// two parts, key1[i * stride1 .. + dim1) and key2[i * stride2 .. + dim2) (dim2 may be 0), and a
// value value[i * value_stride .. + value_dim).  MLA: key = [latent ; k_pe], value = latent.
struct CacheView {
  const float *key1, *key2, *value;
  int64_t stride1, dim1, stride2, dim2, value_stride, value_dim;
};

// Queries: heads rows of q1 [heads, dim1] and q2 [heads, dim2]; writes out [heads, value_dim].
// One pass over the cache with an online softmax (running max and sum per head, the output
// rescaled when the max grows), so every block is fetched from memory once and then read by all
// heads from L1.  Returns false if the block table names a block outside the pool.
bool AttendHeads(const float *q1, const float *q2, int64_t heads, const CacheView &cache, const int32_t *table,
                 int64_t tokens, const Paged &paged, float scale, float *out) {
  const int64_t size = paged.block_size, dim = cache.value_dim, full = dim - dim % kLanes;
  std::memset(out, 0, sizeof(float) * heads * dim);
  if (tokens == 0) return true;
  const int64_t blocks = (tokens + size - 1) / size;
  for (int64_t i = 0; i < blocks; ++i)
    if (table[i] < 0 || table[i] >= paged.num_blocks) return false;

  std::vector<float> weights(size), running_max(heads), running_sum(heads, 0.0f);
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t first_row = static_cast<int64_t>(table[i]) * size, count = std::min(size, tokens - i * size);
    const float *values = cache.value + first_row * cache.value_stride;
    for (int64_t h = 0; h < heads; ++h) {
      float block_max = -INFINITY;
      for (int64_t t = 0; t < count; ++t) {
        const int64_t row = first_row + t;
        float s = Dot(q1 + h * cache.dim1, cache.key1 + row * cache.stride1, cache.dim1);
        if (cache.dim2 > 0) s += Dot(q2 + h * cache.dim2, cache.key2 + row * cache.stride2, cache.dim2);
        weights[t] = s * scale;
        block_max = std::max(block_max, weights[t]);
      }
      float *out_row = out + h * dim;
      if (i == 0 || block_max > running_max[h]) {
        const float rescale = i == 0 ? 0.0f : ExpNonPositive(running_max[h] - block_max);
        running_sum[h] *= rescale;
        for (int64_t j = 0; j < dim; ++j) out_row[j] *= rescale;
        running_max[h] = block_max;
      }
      float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
      for (int64_t t = 0; t < count; ++t) {
        weights[t] = ExpNonPositive(weights[t] - running_max[h]);
        block_sum += weights[t];
      }
      running_sum[h] += block_sum;
      // Each output chunk stays in a register across the block's rows.
      for (int64_t j = 0; j < full; j += kLanes) {
        Vec acc = Load(out_row + j);
        for (int64_t t = 0; t < count; ++t) acc += weights[t] * Load(values + t * cache.value_stride + j);
        Store(out_row + j, acc);
      }
      for (int64_t j = full; j < dim; ++j)
        for (int64_t t = 0; t < count; ++t) out_row[j] += weights[t] * values[t * cache.value_stride + j];
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float inverse = 1.0f / running_sum[h];
    for (int64_t j = 0; j < dim; ++j) out[h * dim + j] *= inverse;
  }
  return true;
}

int MlaDecode(const float *q_latent, const float *q_pe, const float *latent, const float *k_pe,
              const Paged &paged, float scale, int64_t heads, int64_t rank, int64_t rope, float *out) {
  // Split heads across threads only when there are fewer sequences than threads (batch 1).
  const int64_t threads = ThreadCount();
  const int64_t groups = paged.batch >= threads ? 1 : std::min<int64_t>(heads, (threads + paged.batch - 1) / paged.batch);
  const int64_t per_group = (heads + groups - 1) / groups;
  const int64_t tasks = paged.batch * groups;
  const CacheView cache{latent, k_pe, latent, rank, rank, rope, rope, rank, rank};
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / groups, h0 = (task % groups) * per_group, h1 = std::min(heads, h0 + per_group);
    if (h0 >= h1) continue;
    const int64_t first = b * heads + h0;
    if (!AttendHeads(q_latent + first * rank, q_pe + first * rope, h1 - h0, cache,
                     paged.tables + b * paged.max_blocks, paged.lens[b], paged, scale, out + first * rank))
      failed |= 1;
  }
  return failed ? 4 : 0;
}

int GqaDecode(const float *q, const float *k, const float *v, const Paged &paged, float scale, int64_t heads,
              int64_t kv_heads, int64_t dim, float *out) {
  const int64_t group = heads / kv_heads;
  const int64_t tasks = paged.batch * kv_heads;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / kv_heads, g = task % kv_heads;
    const CacheView cache{k + g * dim, nullptr, v + g * dim, kv_heads * dim, dim, 0, 0, kv_heads * dim, dim};
    const int64_t first = b * heads + g * group;
    if (!AttendHeads(q + first * dim, nullptr, group, cache, paged.tables + b * paged.max_blocks, paged.lens[b],
                     paged, scale, out + first * dim))
      failed |= 1;
  }
  return failed ? 4 : 0;
}

}  // namespace

extern "C" int PagedMlaDecode(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 8) return 1;
  const char *expected[8] = {"float32", "float32", "float32", "float32", "int32", "int32", "float32", "float32"};
  for (int i = 0; i < 8; ++i)
    if (!IsDtype(dtypes[i], expected[i])) return 2;
  const int want_ndims[8] = {3, 3, 3, 3, 2, 1, 1, 3};
  for (int i = 0; i < 8; ++i)
    if (ndims[i] != want_ndims[i]) return 3;
  const int64_t batch = shapes[0][0], heads = shapes[0][1], rank = shapes[0][2], rope = shapes[1][2];
  const int64_t num_blocks = shapes[2][0], block_size = shapes[2][1];
  if (shapes[1][0] != batch || shapes[1][1] != heads || shapes[2][2] != rank || shapes[3][0] != num_blocks ||
      shapes[3][1] != block_size || shapes[3][2] != rope || shapes[4][0] != batch || shapes[5][0] != batch ||
      shapes[6][0] != 1 || shapes[7][0] != batch || shapes[7][1] != heads || shapes[7][2] != rank)
    return 3;
  const Paged paged{static_cast<const int32_t *>(params[4]), static_cast<const int32_t *>(params[5]), batch,
                    shapes[4][1], num_blocks, block_size};
  if (!LengthsFit(paged)) return 4;
  return MlaDecode(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                   static_cast<const float *>(params[2]), static_cast<const float *>(params[3]), paged,
                   *static_cast<const float *>(params[6]), heads, rank, rope, static_cast<float *>(params[7]));
}

extern "C" int PagedGqaDecode(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 7) return 1;
  const char *expected[7] = {"float32", "float32", "float32", "int32", "int32", "float32", "float32"};
  for (int i = 0; i < 7; ++i)
    if (!IsDtype(dtypes[i], expected[i])) return 2;
  const int want_ndims[7] = {3, 4, 4, 2, 1, 1, 3};
  for (int i = 0; i < 7; ++i)
    if (ndims[i] != want_ndims[i]) return 3;
  const int64_t batch = shapes[0][0], heads = shapes[0][1], dim = shapes[0][2];
  const int64_t num_blocks = shapes[1][0], block_size = shapes[1][1], kv_heads = shapes[1][2];
  for (int j = 0; j < 4; ++j)
    if (shapes[2][j] != shapes[1][j]) return 3;
  if (shapes[1][3] != dim || kv_heads <= 0 || heads % kv_heads != 0 || shapes[3][0] != batch ||
      shapes[4][0] != batch || shapes[5][0] != 1 || shapes[6][0] != batch || shapes[6][1] != heads ||
      shapes[6][2] != dim)
    return 3;
  const Paged paged{static_cast<const int32_t *>(params[3]), static_cast<const int32_t *>(params[4]), batch,
                    shapes[3][1], num_blocks, block_size};
  if (!LengthsFit(paged)) return 4;
  return GqaDecode(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                   static_cast<const float *>(params[2]), paged, *static_cast<const float *>(params[5]), heads,
                   kv_heads, dim, static_cast<float *>(params[6]));
}
