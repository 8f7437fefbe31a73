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
// Every head of a (sequence, KV group) is processed by one task so each cached row is read from
// memory once and reused by all the heads that attend to it: that reuse is exactly why MLA, whose
// single latent row serves all H heads, moves 3x fewer bytes than GQA on SmolLM2.  Tasks are
// spread over OpenMP threads; rows of one block are contiguous, so the inner loops are unit-stride
// and vectorise (omp simd).  Return codes (non-zero = MindSpore raises): 1 bad arity, 2 bad dtype,
// 3 bad shape, 4 block id or length out of range.
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

inline float Dot(const float *a, const float *b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void Axpy(float *y, float alpha, const float *x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

bool IsDtype(const char *dtype, const char *expected) { return std::string(dtype) == expected; }

int ThreadCount() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Row index (block * S + offset) of every cached token of one sequence, or -1 if a block id is
// out of range; checked once per task so the hot loops need no bounds checks.
bool TokenRows(const int32_t *table, int64_t tokens, int64_t block_size, int64_t num_blocks,
               std::vector<int64_t> *rows) {
  rows->resize(tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t block = table[t / block_size];
    if (block < 0 || block >= num_blocks) return false;
    (*rows)[t] = block * block_size + t % block_size;
  }
  return true;
}

// In place: scores[h*T .. h*T+T) -> exp(s - max); returns 1 / sum per head in inv_sums.
void SoftmaxNumerators(float *scores, int64_t heads, int64_t tokens, float *inv_sums) {
  for (int64_t h = 0; h < heads; ++h) {
    float *row = scores + h * tokens;
    float peak = row[0];
    for (int64_t t = 1; t < tokens; ++t) peak = std::max(peak, row[t]);
    float sum = 0.0f;
    for (int64_t t = 0; t < tokens; ++t) {
      row[t] = std::exp(row[t] - peak);
      sum += row[t];
    }
    inv_sums[h] = 1.0f / sum;
  }
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

// One task: heads [h0, h1) of sequence b attending to keys = [key_a | key_b] rows, values = value
// rows (for MLA the value rows are the latent rows themselves).
struct HeadGroupTask {
  int64_t b, h0, h1;
};

int MlaDecode(const float *q_latent, const float *q_pe, const float *latent, const float *k_pe,
              const Paged &paged, float scale, int64_t heads, int64_t rank, int64_t rope, float *out) {
  // Split heads across threads only when there are fewer sequences than threads (batch 1).
  const int64_t threads = ThreadCount();
  const int64_t groups = paged.batch >= threads ? 1 : std::min<int64_t>(heads, (threads + paged.batch - 1) / paged.batch);
  const int64_t per_group = (heads + groups - 1) / groups;
  std::vector<HeadGroupTask> tasks;
  for (int64_t b = 0; b < paged.batch; ++b)
    for (int64_t h0 = 0; h0 < heads; h0 += per_group) tasks.push_back({b, h0, std::min(heads, h0 + per_group)});

  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
  for (int64_t i = 0; i < static_cast<int64_t>(tasks.size()); ++i) {
    const HeadGroupTask task = tasks[i];
    const int64_t nh = task.h1 - task.h0;
    float *out_rows = out + (task.b * heads + task.h0) * rank;
    std::memset(out_rows, 0, sizeof(float) * nh * rank);
    const int64_t tokens = paged.lens[task.b];
    if (tokens == 0) continue;
    std::vector<int64_t> rows;
    if (!TokenRows(paged.tables + task.b * paged.max_blocks, tokens, paged.block_size, paged.num_blocks, &rows)) {
      failed |= 1;
      continue;
    }
    const float *ql = q_latent + (task.b * heads + task.h0) * rank;
    const float *qp = q_pe + (task.b * heads + task.h0) * rope;
    std::vector<float> scores(nh * tokens), inv_sums(nh);
    for (int64_t t = 0; t < tokens; ++t) {
      const float *c = latent + rows[t] * rank;
      const float *p = k_pe + rows[t] * rope;
      for (int64_t h = 0; h < nh; ++h)
        scores[h * tokens + t] = (Dot(ql + h * rank, c, rank) + Dot(qp + h * rope, p, rope)) * scale;
    }
    SoftmaxNumerators(scores.data(), nh, tokens, inv_sums.data());
    for (int64_t t = 0; t < tokens; ++t) {
      const float *c = latent + rows[t] * rank;
      for (int64_t h = 0; h < nh; ++h) Axpy(out_rows + h * rank, scores[h * tokens + t], c, rank);
    }
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t j = 0; j < rank; ++j) out_rows[h * rank + j] *= inv_sums[h];
  }
  return failed ? 4 : 0;
}

int GqaDecode(const float *q, const float *k, const float *v, const Paged &paged, float scale, int64_t heads,
              int64_t kv_heads, int64_t dim, float *out) {
  const int64_t group = heads / kv_heads;
  const int64_t tasks = paged.batch * kv_heads;
  int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(| : failed)
  for (int64_t i = 0; i < tasks; ++i) {
    const int64_t b = i / kv_heads, g = i % kv_heads;
    float *out_rows = out + (b * heads + g * group) * dim;
    std::memset(out_rows, 0, sizeof(float) * group * dim);
    const int64_t tokens = paged.lens[b];
    if (tokens == 0) continue;
    std::vector<int64_t> rows;
    if (!TokenRows(paged.tables + b * paged.max_blocks, tokens, paged.block_size, paged.num_blocks, &rows)) {
      failed |= 1;
      continue;
    }
    const float *qg = q + (b * heads + g * group) * dim;
    std::vector<float> scores(group * tokens), inv_sums(group);
    for (int64_t t = 0; t < tokens; ++t) {
      const float *key = k + (rows[t] * kv_heads + g) * dim;
      for (int64_t h = 0; h < group; ++h) scores[h * tokens + t] = Dot(qg + h * dim, key, dim) * scale;
    }
    SoftmaxNumerators(scores.data(), group, tokens, inv_sums.data());
    for (int64_t t = 0; t < tokens; ++t) {
      const float *value = v + (rows[t] * kv_heads + g) * dim;
      for (int64_t h = 0; h < group; ++h) Axpy(out_rows + h * dim, scores[h * tokens + t], value, dim);
    }
    for (int64_t h = 0; h < group; ++h)
      for (int64_t j = 0; j < dim; ++j) out_rows[h * dim + j] *= inv_sums[h];
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
