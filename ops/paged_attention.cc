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
// PagedGqaStep and PagedMlaStep (below) add the rest of a decode layer's attention half: RoPE, the
// cache write (in place) and, for MLA, the absorption through W_UK and W_UV.
// Return codes (non-zero = MindSpore raises): 1 bad arity, 2 bad dtype, 3 bad shape, 4 block id,
// slot or length out of range, 6 a pool buffer that is not the host's pool (the steps).
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

// ---------------------------------------------------------------------------------------------------
// The attention half of a decode layer step, from the projection output to the attention output, as
// one call (the serving engine's fused bf16 decode graph: MindSpore's fixed cost per operator on CPU
// outweighs the arithmetic of a decode batch, and this replaces ~20 of them per layer).  Float32
// throughout, like the kernels above.  C new tokens per sequence (the engine decodes with C = 1).
//
//   PagedGqaStep  inputs  qkv        [B, C, (H + 2·KV)·d]  Q|K|V projection of the new tokens
//                         cos, sin   [B, C, d/2]           RoPE of each new token (rotate-half pairing)
//                         slots      [B·C, 2] int32        (block, offset) of each new token's cache entry
//                         k, v       [N, S, KV, d]         the layer's pools, written in place at `slots`
//                         tables     [B, M] int32, positions [B, C] int32, lens [B] int32, scale [1]
//                         pool_addrs [2] int64             where the host keeps k and v
//                 output  out [B, C, H·d]
//   PagedMlaStep  inputs  qa         [B, C, H·(dn + dr) + r + dr]  Q | latent | k_pe projection
//                         cos, sin   [B, C, dr/2], slots, latent [N, S, r], k_pe [N, S, dr] (written in
//                         place), tables, positions, lens, scale,
//                         w_kv       [H, dn + dv, r]       kv_b_proj per head: W_UK rows, then W_UV rows
//                         pool_addrs [2] int64             where the host keeps latent and k_pe
//                         (optional) latent_norm [r], eps [1]: RMSNorm of the latent before it is cached
//                 output  out [B, C, H·dv] = absorbed MLA: q_latent = q_nope·W_UK, attention over the
//                         latent cache, expanded through W_UVᵀ
//
// Query (b, c) attends to the cached tokens j <= positions[b, c] with j < lens[b] (lens 0 = a padding
// row: zeros).
//
// Invariants of the in-place write:
//  * The pools are written through the buffers MindSpore hands the kernel for those inputs.  They are
//    the pools' own memory only when a pool reaches the kernel as a graph input (a numpy-backed Tensor
//    on CPU); behind another op (e.g. scatter_nd_update) the kernel would get that op's output buffer
//    and the write would be lost.  So the kernel compares the buffers with `pool_addrs`, recorded by
//    the host from the numpy arrays, and fails (code 6) before writing anything if either differs.
//  * Every new entry is written (phase 1) before any query reads the cache (phase 2), so the new
//    tokens attend to themselves.  Phase 1 runs in row order on one thread: rows sharing a slot (the
//    padding rows on the null block) leave the last row's entry, as a scatter does.

namespace {

// RoPE, rotate-half pairing, over a vector of 2·half components: [x1·c − x2·s ; x2·c + x1·s], every
// product and sum rounded on its own as MindSpore's elementwise ops do (no fused multiply-add), so a
// rotated key is bit for bit the one the per-op layer step caches.
__attribute__((optimize("fp-contract=off"))) void Rotate(const float *x, const float *cos, const float *sin,
                                                         int64_t half, float *out) {
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = x[j], x2 = x[half + j];
    out[j] = x1 * cos[j] - x2 * sin[j];
    out[half + j] = x2 * cos[j] + x1 * sin[j];
  }
}

struct StepRows {
  const int32_t *slots, *positions;
  int64_t steps;  // C, new tokens per sequence
};

// Cache rows the query (b, c) may read.
inline int64_t Visible(const Paged &paged, const StepRows &rows, int64_t b, int64_t c) {
  const int64_t position = rows.positions[b * rows.steps + c];
  return std::max<int64_t>(0, std::min<int64_t>(position + 1, paged.lens[b]));
}

// Row index (block * S + offset) of each new token's cache entry, or -1 if a slot is out of range.
bool SlotRows(const StepRows &rows, const Paged &paged, std::vector<int64_t> &out) {
  out.resize(paged.batch * rows.steps);
  for (size_t r = 0; r < out.size(); ++r) {
    const int64_t block = rows.slots[2 * r], offset = rows.slots[2 * r + 1];
    if (block < 0 || block >= paged.num_blocks || offset < 0 || offset >= paged.block_size) return false;
    out[r] = block * paged.block_size + offset;
  }
  return true;
}

int GqaStep(const float *qkv, const float *cos, const float *sin, float *k, float *v, const Paged &paged,
            const StepRows &rows, float scale, int64_t heads, int64_t kv_heads, int64_t dim, float *out) {
  const int64_t width = (heads + 2 * kv_heads) * dim, half = dim / 2, entry = kv_heads * dim;
  std::vector<int64_t> cache_rows;
  if (!SlotRows(rows, paged, cache_rows)) return 4;
  for (size_t r = 0; r < cache_rows.size(); ++r) {  // phase 1: the new K (rotated) and V entries
    const float *source = qkv + r * width + heads * dim;
    for (int64_t g = 0; g < kv_heads; ++g)
      Rotate(source + g * dim, cos + r * half, sin + r * half, half, k + cache_rows[r] * entry + g * dim);
    std::memcpy(v + cache_rows[r] * entry, source + entry, sizeof(float) * entry);
  }
  const int64_t group = heads / kv_heads, tasks = paged.batch * kv_heads;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
  for (int64_t task = 0; task < tasks; ++task) {  // phase 2: one (sequence, KV group) per task
    const int64_t b = task / kv_heads, g = task % kv_heads;
    const CacheView cache{k + g * dim, nullptr, v + g * dim, entry, dim, 0, 0, entry, dim};
    std::vector<float> query(group * dim);
    for (int64_t c = 0; c < rows.steps; ++c) {
      const int64_t r = b * rows.steps + c;
      for (int64_t h = 0; h < group; ++h)
        Rotate(qkv + r * width + (g * group + h) * dim, cos + r * half, sin + r * half, half, query.data() + h * dim);
      if (!AttendHeads(query.data(), nullptr, group, cache, paged.tables + b * paged.max_blocks,
                       Visible(paged, rows, b, c), paged, scale, out + (r * heads + g * group) * dim))
        failed |= 1;
    }
  }
  return failed ? 4 : 0;
}

struct MlaShape {
  int64_t heads, nope, rope, value, rank;
};

int MlaStep(const float *qa, const float *cos, const float *sin, float *latent, float *k_pe, const Paged &paged,
            const StepRows &rows, float scale, const float *w_kv, const float *latent_norm, float eps,
            const MlaShape &s, float *out) {
  const int64_t query_width = s.heads * (s.nope + s.rope), width = query_width + s.rank + s.rope;
  const int64_t half = s.rope / 2, per_head = s.nope + s.value;
  std::vector<int64_t> cache_rows;
  if (!SlotRows(rows, paged, cache_rows)) return 4;
  for (size_t r = 0; r < cache_rows.size(); ++r) {  // phase 1: the latent (normed if asked) and k_pe
    const float *source = qa + r * width + query_width;
    float *target = latent + cache_rows[r] * s.rank;
    if (latent_norm != nullptr) {
      float squares = 0.0f;
      for (int64_t j = 0; j < s.rank; ++j) squares += source[j] * source[j];
      const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(s.rank) + eps);
      for (int64_t j = 0; j < s.rank; ++j) target[j] = source[j] * inverse * latent_norm[j];
    } else {
      std::memcpy(target, source, sizeof(float) * s.rank);
    }
    Rotate(source + s.rank, cos + r * half, sin + r * half, half, k_pe + cache_rows[r] * s.rope);
  }
  // Phase 2 as MlaDecode: heads split across threads only when there are fewer sequences than threads.
  const int64_t threads = ThreadCount();
  const int64_t groups =
      paged.batch >= threads ? 1 : std::min<int64_t>(s.heads, (threads + paged.batch - 1) / paged.batch);
  const int64_t per_group = (s.heads + groups - 1) / groups, tasks = paged.batch * groups;
  // Exactness-mode layers (dn = 0) score with k_pe alone: the latent's key part has width 0.
  const CacheView cache{latent, k_pe, latent, s.rank, s.nope > 0 ? s.rank : 0, s.rope, s.rope, s.rank, s.rank};
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / groups, h0 = (task % groups) * per_group, h1 = std::min(s.heads, h0 + per_group);
    if (h0 >= h1) continue;
    const int64_t count = h1 - h0;
    std::vector<float> q_latent(count * s.rank), q_pe(count * s.rope), out_latent(count * s.rank);
    for (int64_t c = 0; c < rows.steps; ++c) {
      const int64_t r = b * rows.steps + c;
      for (int64_t i = 0; i < count; ++i) {
        const float *q = qa + r * width + (h0 + i) * (s.nope + s.rope);
        const float *w_uk = w_kv + (h0 + i) * per_head * s.rank;
        Rotate(q + s.nope, cos + r * half, sin + r * half, half, q_pe.data() + i * s.rope);
        float *absorbed = q_latent.data() + i * s.rank;  // q_nope · W_UK: rows of W_UK scaled and summed
        std::memset(absorbed, 0, sizeof(float) * s.rank);
        for (int64_t n = 0; n < s.nope; ++n) {
          const float weight = q[n], *w_row = w_uk + n * s.rank;
#pragma omp simd
          for (int64_t j = 0; j < s.rank; ++j) absorbed[j] += weight * w_row[j];
        }
      }
      if (!AttendHeads(q_latent.data(), q_pe.data(), count, cache, paged.tables + b * paged.max_blocks,
                       Visible(paged, rows, b, c), paged, scale, out_latent.data())) {
        failed |= 1;
        continue;
      }
      for (int64_t i = 0; i < count; ++i) {  // out_latent · W_UVᵀ
        const float *w_uv = w_kv + ((h0 + i) * per_head + s.nope) * s.rank;
        float *target = out + (r * s.heads + h0 + i) * s.value;
        for (int64_t j = 0; j < s.value; ++j)
          target[j] = Dot(out_latent.data() + i * s.rank, w_uv + j * s.rank, s.rank);
      }
    }
  }
  return failed ? 4 : 0;
}

// The inputs both steps share, from index `first` (slots) on: slots, two pools, tables, positions,
// lens, scale, and (at `addresses`) the pools' host addresses.  Checks dtypes, ranks and the paged
// shapes; 0 if they fit.
int CheckPaged(void **params, int *ndims, int64_t **shapes, const char **dtypes, int pool_rank, int addresses,
               int64_t batch, int64_t steps) {
  const int first = 3;
  const char *expected[7] = {"int32", "float32", "float32", "int32", "int32", "int32", "float32"};
  const int ranks[7] = {2, pool_rank, pool_rank, 2, 2, 1, 1};
  for (int i = 0; i < 7; ++i) {
    if (!IsDtype(dtypes[first + i], expected[i])) return 2;
    if (ndims[first + i] != ranks[i]) return 3;
  }
  if (!IsDtype(dtypes[addresses], "int64")) return 2;
  if (ndims[addresses] != 1 || shapes[addresses][0] != 2) return 3;
  const int64_t *slots = shapes[first], *pool = shapes[first + 1], *second = shapes[first + 2];
  if (slots[0] != batch * steps || slots[1] != 2 || second[0] != pool[0] || second[1] != pool[1] ||
      shapes[first + 3][0] != batch || shapes[first + 4][0] != batch || shapes[first + 4][1] != steps ||
      shapes[first + 5][0] != batch || shapes[first + 6][0] != 1)
    return 3;
  const int64_t *host = static_cast<const int64_t *>(params[addresses]);
  if (reinterpret_cast<intptr_t>(params[first + 1]) != host[0] ||
      reinterpret_cast<intptr_t>(params[first + 2]) != host[1])
    return 6;
  return 0;
}

Paged PagedOf(void **params, int64_t **shapes, int64_t batch) {
  return Paged{static_cast<const int32_t *>(params[6]), static_cast<const int32_t *>(params[8]), batch,
               shapes[6][1], shapes[4][0], shapes[4][1]};
}

// cos and sin [B, C, half], float32.
bool RopeFits(int *ndims, int64_t **shapes, const char **dtypes, int64_t batch, int64_t steps, int64_t half) {
  for (int i = 1; i <= 2; ++i)
    if (!IsDtype(dtypes[i], "float32") || ndims[i] != 3 || shapes[i][0] != batch || shapes[i][1] != steps ||
        shapes[i][2] != half)
      return false;
  return true;
}

}  // namespace

extern "C" int PagedGqaStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 12) return 1;
  if (!IsDtype(dtypes[0], "float32") || !IsDtype(dtypes[11], "float32")) return 2;
  if (ndims[0] != 3 || ndims[11] != 3) return 3;
  const int64_t batch = shapes[0][0], steps = shapes[0][1], width = shapes[0][2];
  if (ndims[4] != 4) return 3;
  const int64_t kv_heads = shapes[4][2], dim = shapes[4][3];
  if (kv_heads <= 0 || dim <= 0 || dim % 2 != 0 || width % dim != 0) return 3;
  const int64_t heads = width / dim - 2 * kv_heads;
  if (heads <= 0 || heads % kv_heads != 0) return 3;
  if (!RopeFits(ndims, shapes, dtypes, batch, steps, dim / 2)) return 3;
  const int status = CheckPaged(params, ndims, shapes, dtypes, 4, 10, batch, steps);
  if (status != 0) return status;
  for (int j = 0; j < 4; ++j)
    if (shapes[5][j] != shapes[4][j]) return 3;
  if (shapes[11][0] != batch || shapes[11][1] != steps || shapes[11][2] != heads * dim) return 3;
  const Paged paged = PagedOf(params, shapes, batch);
  if (!LengthsFit(paged)) return 4;
  const StepRows rows{static_cast<const int32_t *>(params[3]), static_cast<const int32_t *>(params[7]), steps};
  const float scale = *static_cast<const float *>(params[9]);
  return GqaStep(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 static_cast<const float *>(params[2]), static_cast<float *>(params[4]),
                 static_cast<float *>(params[5]), paged, rows, scale, heads, kv_heads, dim,
                 static_cast<float *>(params[11]));
}

extern "C" int PagedMlaStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 13 && nparam != 15) return 1;
  const bool normed = nparam == 15;
  const int output = nparam - 1;
  if (!IsDtype(dtypes[0], "float32") || !IsDtype(dtypes[10], "float32") || !IsDtype(dtypes[output], "float32"))
    return 2;
  if (ndims[0] != 3 || ndims[10] != 3 || ndims[output] != 3 || ndims[4] != 3 || ndims[5] != 3) return 3;
  const int64_t batch = shapes[0][0], steps = shapes[0][1], width = shapes[0][2];
  const int64_t rank = shapes[4][2], rope = shapes[5][2], heads = shapes[10][0], per_head = shapes[10][1];
  if (rank <= 0 || rope <= 0 || rope % 2 != 0 || heads <= 0 || shapes[10][2] != rank) return 3;
  const int64_t query_width = width - rank - rope;
  if (query_width <= 0 || query_width % heads != 0 || query_width / heads < rope) return 3;
  const MlaShape shape{heads, query_width / heads - rope, rope, per_head - (query_width / heads - rope), rank};
  if (shape.value <= 0) return 3;
  if (!RopeFits(ndims, shapes, dtypes, batch, steps, rope / 2)) return 3;
  const int status = CheckPaged(params, ndims, shapes, dtypes, 3, 11, batch, steps);
  if (status != 0) return status;
  if (shapes[output][0] != batch || shapes[output][1] != steps || shapes[output][2] != heads * shape.value) return 3;
  const float *latent_norm = nullptr;
  float eps = 0.0f;
  if (normed) {
    if (!IsDtype(dtypes[12], "float32") || !IsDtype(dtypes[13], "float32")) return 2;
    if (ndims[12] != 1 || shapes[12][0] != rank || ndims[13] != 1 || shapes[13][0] != 1) return 3;
    latent_norm = static_cast<const float *>(params[12]);
    eps = *static_cast<const float *>(params[13]);
  }
  const Paged paged = PagedOf(params, shapes, batch);
  if (!LengthsFit(paged)) return 4;
  const StepRows rows{static_cast<const int32_t *>(params[3]), static_cast<const int32_t *>(params[7]), steps};
  const float scale = *static_cast<const float *>(params[9]);
  return MlaStep(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 static_cast<const float *>(params[2]), static_cast<float *>(params[4]),
                 static_cast<float *>(params[5]), paged, rows, scale, static_cast<const float *>(params[10]),
                 latent_norm, eps, shape, static_cast<float *>(params[output]));
}
