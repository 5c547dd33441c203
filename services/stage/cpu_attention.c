/* ai.splitllm Attention: grouped-query attention with rotary embedding, over a KV cache written in place.
 *
 * Attention(qkv float [B*S, (H + 2G) * D], past_key float16 [B, G, C, D], past_value float16 [B, G, C, D],
 *           seqlens_k int32 [B], cos float [C', D/2], sin float [C', D/2])
 *     -> Y float [B*S, H * D], present_key float16 [B, G, C, D], present_value float16 [B, G, C, D]
 * attributes num_heads = H, kv_num_heads = G (H a multiple of G); D is past_key's last dimension.
 *
 * qkv's rows b*S .. b*S + S - 1 are sequence b's new rows; row s is at position p = seqlens_k[b] - S + 1 + s, as in
 * GroupQueryAttention: one prompt chunk (B = 1) or one token of each of B sessions (S = 1). Each row's q and k heads
 * are rotated by the rotary embedding at p (the two halves of a head, not interleaved: cos and sin rows p of C' >= p + 1);
 * k and v are written into the cache at p; q head h attends to positions 0..p of kv head h / (H / G), scaled by
 * 1 / sqrt(D), with an exact softmax. The cache holds float16, rounded to nearest (llama.cpp's default cache): half
 * the memory of float32 and half the bytes a step reads; the arithmetic is float. present is past's buffer when the
 * caller binds both to one (the stage does): then nothing is copied. Otherwise past is copied into present first.
 *
 * Why our own: ONNX Runtime's GroupQueryAttention cost ~20 % of a decode step (~47 us a layer at position 130) and
 * ~27 % of a 1024-token prompt (Zen 3, 2 threads), and needs two reshapes around it. Here one task takes all the q
 * heads of one kv head over a block of rows, FlashAttention-style: key tiles of 64 rows, read once for all those
 * heads, an online softmax, and the next tile's rows prefetched; a block of prompt rows converts each tile to float
 * once for all its rows (head sizes 32 and 64; up to 128 in 16 lanes where the CPU has AVX-512, which also decodes in
 * 16 lanes at head sizes that are multiples of 64). A decode step of a few sessions, which has fewer (sequence, kv head)
 * tasks than threads want, is split over the keys and merged. bench/attention_speed.py: decode 2-2.8x faster than
 * GroupQueryAttention at positions 160-1000, a 1024-token prompt 1.05x on Zen 3 (AVX2); on Zen 5 decode 2.7-5.4x, a
 * 1024-token prompt 1.13-1.23x (SmolLM2) and 1.24-1.27x (Llama 3 8B's heads).
 * qkv and Y are the rows the matmuls take and give, so the graph has no reshape.
 */
#include "cpu_kernels.h"

enum {
  ROPE_ROWS = 16,          /* rows per rotary task */
  ROW_BLOCK = 16,          /* rows per attention task */
  SERIAL_PAIRS = 4096,     /* below this many (row, key, head) triples, one thread does it all: waking the other costs more */
  KEY_TILE = 64,           /* keys per tile: 16 KB of K and 16 of V at head_dim 64 */
  MAX_GROUP = 64,          /* q heads per kv head, at most */
  SPLIT_BELOW = 8,         /* decode with fewer (sequence, kv head) tasks than this splits them over the keys, */
  SPLIT_KEYS = 256,        /* in runs of about this many keys (split_keys: more with AVX-512), */
  MAX_SPLITS = 8,          /* at most this many a task */
  STACK_Q = 4096,          /* rotated queries on the stack up to this many floats */
  MAX_HEAD_DIM = 1024,
  BLOCK_HEAD_DIM = 128,    /* the largest head size a block of rows converts key tiles for (block_head_dim) */
  EXACT_ROWS = 8,          /* up to this many rows of one sequence attend one by one, as decode steps would */
};

/* Online softmax over tiles of keys (as FlashAttention): per query, m is the largest score so far, l the sum of
 * exp(score - m), and y the sum of exp(score - m) * v; each tile rescales them to its new m. y / l at the end. */
typedef struct {
  float *m, *l, *y; /* y: nq rows of D, consecutive */
} Running;

/* nq queries (rows of D, consecutive) against n keys (rows of D, the tile's): r updated; s: scratch of nq * KEY_TILE.
 * first: the tile's first use in this task (its rows are not in cache yet; the next tile's neither) */
typedef void (*Tile)(const float* q, int nq, const uint16_t* k, const uint16_t* v, int n, int D, float* s, Running r,
                     int first);

typedef struct {
  const float* qkv;
  uint16_t *k, *v; /* present [B, G, C, D], float16 */
  const int32_t* seqlens;
  const float *cos, *sin;
  float* q; /* rotated queries, scaled by 1 / sqrt(D): [B*S, H, D] */
  float* y;
  int B, S, H, G, D, C, blocks; /* blocks: ROW_BLOCK-row blocks of one sequence */
  float scale;
  int splits, split_keys; /* decode split over the keys: each (sequence, kv head) in `splits` runs of split_keys */
  float* part;            /* their running sums: per task, per q head m and l, then y [D] */
} AttnJob;

/* out = x rotated by the angles whose cos and sin are cs and sn (halves: x[j] with x[j + D/2]), times scale */
static void rotate(const float* x, const float* cs, const float* sn, int half, float scale, float* out) {
  for (int j = 0; j < half; j++) {
    const float a = x[j], b = x[j + half];
    out[j] = (a * cs[j] - b * sn[j]) * scale;
    out[j + half] = (b * cs[j] + a * sn[j]) * scale;
  }
}

/* A tile's scores are in s[0..n) (one query), their maximum mx: exponentials in place, and the running sums rescaled
 * to the new maximum. Returns the factor y must be scaled by before this tile's values go in. */
static float rescale(float* s, int n, float mx, float* m, float* l, float (*exps)(float*, int, float)) {
  mx = fmaxf(mx, *m);
  const float old = *m == -INFINITY ? 0.f : expf(*m - mx);
  *l = *l * old + exps(s, n, mx);
  *m = mx;
  return old;
}

static float max_scalar(const float* s, int n) {
  float mx = -INFINITY;
  for (int j = 0; j < n; j++) mx = fmaxf(mx, s[j]);
  return mx;
}

/* s[j] = exp(s[j] - mx); returns their sum */
static float exps_scalar(float* s, int n, float mx) {
  float sum = 0;
  for (int j = 0; j < n; j++) sum += s[j] = expf(s[j] - mx);
  return sum;
}

/* the cache's new rows: float16, rounded to nearest */
static void halves_scalar(const float* x, uint16_t* out, int n) {
  for (int i = 0; i < n; i++) out[i] = float_to_half(x[i]);
}

/* One tile, portable C. */
static void tile_scalar(const float* q, int nq, const uint16_t* k, const uint16_t* v, int n, int D, float* s,
                        Running r, int first) {
  (void)first;
  for (int i = 0; i < nq; i++, q += D) {
    for (int j = 0; j < n; j++) {
      float dot = 0;
      for (int d = 0; d < D; d++) dot += q[d] * half_to_float(k[(size_t)j * D + d]);
      s[j] = dot;
    }
    float* y = r.y + (size_t)i * D;
    const float old = rescale(s, n, max_scalar(s, n), r.m + i, r.l + i, exps_scalar);
    for (int d = 0; d < D; d++) y[d] *= old;
    for (int j = 0; j < n; j++)
      for (int d = 0; d < D; d++) y[d] += s[j] * half_to_float(v[(size_t)j * D + d]);
  }
}

#ifdef HAVE_X86
AVX2 static inline float hsum_avx2(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* a query's score against one key row of the cache, D a multiple of 8 */
AVX2 static inline float dot_avx2(const float* q, const uint16_t* k, int D) {
  __m256 a = _mm256_setzero_ps();
  for (int d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), LOAD_HALVES(k + d), a);
  return hsum_avx2(a);
}

AVX2 static float max_avx2(const float* s, int n) {
  __m256 mx8 = _mm256_set1_ps(-INFINITY);
  int j = 0;
  for (; j + 8 <= n; j += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + j));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx8), _mm256_extractf128_ps(mx8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return fmaxf(_mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4))), max_scalar(s + j, n - j));
}

AVX2 static float exps_avx2(float* s, int n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 sum8 = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  return hsum_avx2(sum8) + exps_scalar(s + j, n - j, mx);
}

/* tile_scalar's math for NQ queries at once (the q heads that share a kv head), D a multiple of 16: each key and value
 * row is loaded once for all of them. Scores 2 keys at a time (2 * NQ FMA chains of D / 8), values 16 columns at a
 * time (2 * NQ chains). NQ is a constant in each copy, so the accumulators stay in registers. */
AVX2 static inline __attribute__((always_inline)) void tile_avx2_n(const float* q, const int NQ, const uint16_t* k,
                                                                   const uint16_t* v, int n, int D, float* s,
                                                                   Running r, int first) {
  int j = 0;
  for (; j + 2 <= n; j += 2) {
    const uint16_t *k0 = k + (size_t)j * D, *k1 = k0 + D;
    if (first) /* the values below read these rows a column block at a time: ask for them early (decode 2.5x faster) */
      for (int c = 0; c < 2 * D; c += 32) { /* a cache line of halves */
        _mm_prefetch((const char*)(v + (size_t)j * D + c), _MM_HINT_T0);
        _mm_prefetch((const char*)(k0 + KEY_TILE * D + c), _MM_HINT_T0); /* and the next tile's keys */
      }
    __m256 a0[4], a1[4];
    for (int i = 0; i < NQ; i++) a0[i] = a1[i] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) {
      const __m256 x0 = LOAD_HALVES(k0 + d), x1 = LOAD_HALVES(k1 + d);
      for (int i = 0; i < NQ; i++) {
        const __m256 qi = _mm256_loadu_ps(q + i * D + d);
        a0[i] = _mm256_fmadd_ps(qi, x0, a0[i]);
        a1[i] = _mm256_fmadd_ps(qi, x1, a1[i]);
      }
    }
    for (int i = 0; i < NQ; i++) { /* [k0 k1 k0 k1] */
      const __m256 h = _mm256_hadd_ps(a0[i], a1[i]);
      __m128 t = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      _mm_storel_pi((__m64*)(s + i * KEY_TILE + j), _mm_hadd_ps(t, t));
    }
  }
  if (j < n)
    for (int i = 0; i < NQ; i++) s[i * KEY_TILE + j] = dot_avx2(q + i * D, k + (size_t)j * D, D);
  __m256 old[4];
  for (int i = 0; i < NQ; i++) old[i] = _mm256_set1_ps(rescale(s + i * KEY_TILE, n, max_avx2(s + i * KEY_TILE, n), r.m + i, r.l + i, exps_avx2));
  for (int d = 0; d < D; d += 16) {
    __m256 e0[4], e1[4];
    for (int i = 0; i < NQ; i++) {
      e0[i] = _mm256_mul_ps(_mm256_loadu_ps(r.y + i * D + d), old[i]);
      e1[i] = _mm256_mul_ps(_mm256_loadu_ps(r.y + i * D + d + 8), old[i]);
    }
    for (j = 0; j < n; j++) {
      const __m256 v0 = LOAD_HALVES(v + (size_t)j * D + d), v1 = LOAD_HALVES(v + (size_t)j * D + d + 8);
      for (int i = 0; i < NQ; i++) {
        const __m256 p = _mm256_broadcast_ss(s + i * KEY_TILE + j);
        e0[i] = _mm256_fmadd_ps(p, v0, e0[i]);
        e1[i] = _mm256_fmadd_ps(p, v1, e1[i]);
      }
    }
    for (int i = 0; i < NQ; i++) {
      _mm256_storeu_ps(r.y + i * D + d, e0[i]);
      _mm256_storeu_ps(r.y + i * D + d + 8, e1[i]);
    }
  }
}

AVX2 static void tile_avx2(const float* q, int nq, const uint16_t* k, const uint16_t* v, int n, int D, float* s,
                           Running r, int first) {
  for (; nq > 0; nq -= 4, q += 4 * D, r.m += 4, r.l += 4, r.y += 4 * D) {
    if (nq >= 4) tile_avx2_n(q, 4, k, v, n, D, s, r, first);
    if (nq == 3) tile_avx2_n(q, 3, k, v, n, D, s, r, first);
    if (nq == 2) tile_avx2_n(q, 2, k, v, n, D, s, r, first);
    if (nq == 1) tile_avx2_n(q, 1, k, v, n, D, s, r, first);
  }
}

/* A block of prompt rows takes each key tile as float once, where tile_avx2 converts it for every row: K transposed,
 * kt[d * KEY_TILE + j], so that a query's scores are FMAs of its broadcast elements against 8 keys at once (no
 * horizontal sums), and V as rows. Columns past the tile's n keys are zero. One layer's attention of a 1024-token
 * prompt, SmolLM2's heads: -10 to -19 % with 2 threads, -12 % with 1 (python /tmp A/B on bench/attention_speed.py's
 * graph, 10-16 rounds). */
AVX2 static void convert_tile_avx2(const uint16_t* k, const uint16_t* v, int n, int D, float* kt, float* vf) {
  for (int j0 = 0; j0 < KEY_TILE; j0 += 8)
    for (int d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; i++)
        r[i] = j0 + i < n ? LOAD_HALVES(k + (size_t)(j0 + i) * D + d0) : _mm256_setzero_ps();
      /* 8x8 transpose: r[i][c] -> kt[(d0 + c) * KEY_TILE + j0 + i] */
      __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      const __m256 c[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                           _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                           _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                           _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      for (int i = 0; i < 8; i++) _mm256_storeu_ps(kt + (size_t)(d0 + i) * KEY_TILE + j0, c[i]);
    }
  for (int j = 0; j < n; j++)
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(vf + (size_t)j * D + d, LOAD_HALVES(v + (size_t)j * D + d));
}

/* NQ queries' scores against the 8 * KV keys of a converted tile from key j0 on: NQ * KV accumulators */
AVX2 static inline __attribute__((always_inline)) void scores_f32(const float* q, const int NQ, const float* kt,
                                                                  int j0, int D, float* s, const int KV) {
  __m256 a[4][4];
  for (int i = 0; i < NQ; i++)
    for (int c = 0; c < KV; c++) a[i][c] = _mm256_setzero_ps();
  for (int d = 0; d < D; d++) {
    const float* row = kt + (size_t)d * KEY_TILE + j0;
    __m256 k[4];
    for (int c = 0; c < KV; c++) k[c] = _mm256_loadu_ps(row + 8 * c);
    for (int i = 0; i < NQ; i++) {
      const __m256 qd = _mm256_broadcast_ss(q + i * D + d);
      for (int c = 0; c < KV; c++) a[i][c] = _mm256_fmadd_ps(qd, k[c], a[i][c]);
    }
  }
  for (int i = 0; i < NQ; i++)
    for (int c = 0; c < KV; c++) _mm256_storeu_ps(s + i * KEY_TILE + j0 + 8 * c, a[i][c]);
}

/* tile_avx2_n on a converted tile. KV and COLS are constants in each copy, so the accumulators stay in registers. */
AVX2 static inline __attribute__((always_inline)) void tile_f32_n(const float* q, const int NQ, const float* kt,
                                                                  const float* vf, int n, int D, float* s,
                                                                  Running r) {
  const int KV = NQ >= 4 ? 2 : 4; /* 4 queries x 4 would need more registers than AVX2 has (Llama 3: +23 %) */
  for (int j0 = 0; j0 < n; j0 += 8 * KV) scores_f32(q, NQ, kt, j0, D, s, KV);
  __m256 old[4];
  for (int i = 0; i < NQ; i++) old[i] = _mm256_set1_ps(rescale(s + i * KEY_TILE, n, max_avx2(s + i * KEY_TILE, n), r.m + i, r.l + i, exps_avx2));
  const int COLS = NQ >= 4 ? 2 : 4; /* 32 columns below 4 queries: 2 * NQ accumulators would wait on the FMAs */
  for (int d = 0; d < D; d += 8 * COLS) {
    __m256 e[4][4];
    for (int i = 0; i < NQ; i++)
      for (int c = 0; c < COLS; c++) e[i][c] = _mm256_mul_ps(_mm256_loadu_ps(r.y + i * D + d + 8 * c), old[i]);
    for (int j = 0; j < n; j++) {
      __m256 x[4];
      for (int c = 0; c < COLS; c++) x[c] = _mm256_loadu_ps(vf + (size_t)j * D + d + 8 * c);
      for (int i = 0; i < NQ; i++) {
        const __m256 p = _mm256_broadcast_ss(s + i * KEY_TILE + j);
        for (int c = 0; c < COLS; c++) e[i][c] = _mm256_fmadd_ps(p, x[c], e[i][c]);
      }
    }
    for (int i = 0; i < NQ; i++)
      for (int c = 0; c < COLS; c++) _mm256_storeu_ps(r.y + i * D + d + 8 * c, e[i][c]);
  }
}

AVX2 static void tile_f32_avx2(const float* q, int nq, const float* kt, const float* vf, int n, int D, float* s,
                               Running r) {
  for (; nq > 0; nq -= 4, q += 4 * D, r.m += 4, r.l += 4, r.y += 4 * D) {
    if (nq >= 4) tile_f32_n(q, 4, kt, vf, n, D, s, r);
    if (nq == 3) tile_f32_n(q, 3, kt, vf, n, D, s, r);
    if (nq == 2) tile_f32_n(q, 2, kt, vf, n, D, s, r);
    if (nq == 1) tile_f32_n(q, 1, kt, vf, n, D, s, r);
  }
}

/* exp_avx2 on both halves of 16 lanes */
AVX512 static inline __m512 exp_avx512(__m512 x) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(exp_avx2(_mm512_castps512_ps256(x))),
                            exp_avx2(_mm512_extractf32x8_ps(x, 1)), 1);
}

/* valid[c]: which of keys 16c .. 16c + 15 of a tile are among its first n */
AVX512 static inline __attribute__((always_inline)) void key_masks(int n, __mmask16 valid[4]) {
  for (int c = 0; c < 4; c++) {
    const int left = n - 16 * c;
    valid[c] = left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
  }
}

/* One query's 64 scores of a tile in x (those not `valid` ignored): their exponentials less the new running maximum
 * stored in s (0 past n), *m and *l updated (as rescale). Returns the factor its y is to be scaled by first. */
AVX512 static inline __attribute__((always_inline)) __m512 softmax512(const __m512 x[4], const __mmask16 valid[4],
                                                                     float* s, float* m, float* l) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int c = 0; c < 4; c++) mx = _mm512_mask_max_ps(mx, valid[c], mx, x[c]);
  const float m_new = fmaxf(_mm512_reduce_max_ps(mx), *m);
  const float scale = *m == -INFINITY ? 0.f : expf(*m - m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < 4; c++) {
    const __m512 e = _mm512_maskz_mov_ps(valid[c], exp_avx512(_mm512_sub_ps(x[c], _mm512_set1_ps(m_new))));
    _mm512_storeu_ps(s + 16 * c, e);
    sum = _mm512_add_ps(sum, e);
  }
  *l = *l * scale + _mm512_reduce_add_ps(sum);
  *m = m_new;
  return _mm512_set1_ps(scale);
}

#define LOAD_HALVES512(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p))) /* 16 floats from 16 halves */

/* The NQ queries' y = y * old + the tile's exponentials (s) times its n value rows, COLS registers of columns at a
 * time: rows of D floats (converted, 64-byte aligned) or, with HALVES, of D halves (the cache's). */
AVX512 static inline __attribute__((always_inline)) void values512(const float* s, const void* v, int n, int D,
                                                                  const int NQ, Running r, const __m512 old[4],
                                                                  const int COLS, const int HALVES) {
  for (int d = 0; d < D; d += 16 * COLS) {
    __m512 e[4][4];
    for (int i = 0; i < NQ; i++)
      for (int c = 0; c < COLS; c++) e[i][c] = _mm512_mul_ps(_mm512_loadu_ps(r.y + i * D + d + 16 * c), old[i]);
    for (int j = 0; j < n; j++) {
      const size_t at = (size_t)j * D + d;
      __m512 x[4];
      for (int c = 0; c < COLS; c++)
        x[c] = HALVES ? LOAD_HALVES512((const uint16_t*)v + at + 16 * c)
                      : _mm512_load_ps((const float*)v + at + 16 * c);
      for (int i = 0; i < NQ; i++) {
        const __m512 p = _mm512_set1_ps(s[i * KEY_TILE + j]);
        for (int c = 0; c < COLS; c++) e[i][c] = _mm512_fmadd_ps(p, x[c], e[i][c]);
      }
    }
    for (int i = 0; i < NQ; i++)
      for (int c = 0; c < COLS; c++) _mm512_storeu_ps(r.y + i * D + d + 16 * c, e[i][c]);
  }
}

/* tile_f32_n in 16 lanes (AVX-512), the softmax in registers: a query's 64 scores stay in 4 registers for their
 * maximum and exponentials (keys past n masked off), which are stored once for the values. */
AVX512 static inline __attribute__((always_inline)) void tile_f32_512_n(const float* q, const int NQ, const float* kt,
                                                                       const float* vf, int n, int D, float* s,
                                                                       Running r, const int COLS) {
  __m512 a[4][4];
  for (int i = 0; i < NQ; i++)
    for (int c = 0; c < 4; c++) a[i][c] = _mm512_setzero_ps();
  for (int d = 0; d < D; d++) {
    const float* row = kt + (size_t)d * KEY_TILE;
    __m512 k[4];
    for (int c = 0; c < 4; c++) k[c] = _mm512_load_ps(row + 16 * c);
    for (int i = 0; i < NQ; i++) {
      const __m512 qd = _mm512_set1_ps(q[i * D + d]);
      for (int c = 0; c < 4; c++) a[i][c] = _mm512_fmadd_ps(qd, k[c], a[i][c]);
    }
  }
  __mmask16 valid[4];
  key_masks(n, valid);
  __m512 old[4];
  for (int i = 0; i < NQ; i++) old[i] = softmax512(a[i], valid, s + i * KEY_TILE, r.m + i, r.l + i);
  values512(s, vf, n, D, NQ, r, old, COLS, 0);
}

/* D is 32, 64, 96 or 128 here (BLOCK_HEAD_DIM): columns 4 or 2 registers at a time */
#define TILE_F32_512(NQ) \
  (D % 64 == 0 ? tile_f32_512_n(q, NQ, kt, vf, n, D, s, r, 4) : tile_f32_512_n(q, NQ, kt, vf, n, D, s, r, 2))

AVX512 static void tile_f32_avx512(const float* q, int nq, const float* kt, const float* vf, int n, int D, float* s,
                                   Running r) {
  for (; nq > 0; nq -= 4, q += 4 * D, r.m += 4, r.l += 4, r.y += 4 * D) {
    if (nq >= 4) TILE_F32_512(4);
    if (nq == 3) TILE_F32_512(3);
    if (nq == 2) TILE_F32_512(2);
    if (nq == 1) TILE_F32_512(1);
  }
}

/* [sum of a's lanes, b's, c's, d's] */
AVX512 static inline __m128 sums4_512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD)); /* a b c d by 128 */
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4E));
  x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xB1)); /* each 128-bit lane's sum in all its 4 floats */
  const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, x));
}

/* tile_avx2_n in 16 lanes (AVX-512), D a multiple of 64: scores 4 keys at a time (4 * NQ FMA chains of D / 16, reduced
 * together), the softmax in registers (softmax512), values 64 columns at a time (values512: 4 * NQ chains). */
AVX512 static inline __attribute__((always_inline)) void tile512_n(const float* q, const int NQ, const uint16_t* k,
                                                                  const uint16_t* v, int n, int D, float* s,
                                                                  Running r, int first) {
  int j = 0;
  for (; j + 4 <= n; j += 4) {
    const uint16_t* kj = k + (size_t)j * D;
    if (first) /* as tile_avx2_n: this tile's values and the next tile's keys */
      for (int c = 0; c < 4 * D; c += 32) {
        _mm_prefetch((const char*)(v + (size_t)j * D + c), _MM_HINT_T0);
        _mm_prefetch((const char*)(kj + KEY_TILE * D + c), _MM_HINT_T0);
      }
    __m512 a[4][4];
    for (int i = 0; i < NQ; i++)
      for (int x = 0; x < 4; x++) a[i][x] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
      __m512 kx[4];
      for (int x = 0; x < 4; x++) kx[x] = LOAD_HALVES512(kj + (size_t)x * D + d);
      for (int i = 0; i < NQ; i++) {
        const __m512 qi = _mm512_loadu_ps(q + i * D + d);
        for (int x = 0; x < 4; x++) a[i][x] = _mm512_fmadd_ps(qi, kx[x], a[i][x]);
      }
    }
    for (int i = 0; i < NQ; i++) _mm_storeu_ps(s + i * KEY_TILE + j, sums4_512(a[i][0], a[i][1], a[i][2], a[i][3]));
  }
  for (; j < n; j++) /* the last 1-3 keys */
    for (int i = 0; i < NQ; i++) s[i * KEY_TILE + j] = dot_avx2(q + i * D, k + (size_t)j * D, D);
  __mmask16 valid[4];
  key_masks(n, valid);
  __m512 old[4];
  for (int i = 0; i < NQ; i++) {
    __m512 x[4];
    for (int c = 0; c < 4; c++) x[c] = _mm512_maskz_loadu_ps(valid[c], s + i * KEY_TILE + 16 * c);
    old[i] = softmax512(x, valid, s + i * KEY_TILE, r.m + i, r.l + i);
  }
  values512(s, v, n, D, NQ, r, old, 4, 1);
}

/* tile_avx2 in 16 lanes where D is a multiple of 64 (decode steps, and prompt rows that take no block) */
AVX512 static void tile_avx512(const float* q, int nq, const uint16_t* k, const uint16_t* v, int n, int D, float* s,
                               Running r, int first) {
  if (D % 64) {
    tile_avx2(q, nq, k, v, n, D, s, r, first);
    return;
  }
  for (; nq > 0; nq -= 4, q += 4 * D, r.m += 4, r.l += 4, r.y += 4 * D) {
    if (nq >= 4) tile512_n(q, 4, k, v, n, D, s, r, first);
    if (nq == 3) tile512_n(q, 3, k, v, n, D, s, r, first);
    if (nq == 2) tile512_n(q, 2, k, v, n, D, s, r, first);
    if (nq == 1) tile512_n(q, 1, k, v, n, D, s, r, first);
  }
}

AVX2 static void halves_avx2(const float* x, uint16_t* out, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  halves_scalar(x + i, out + i, n - i);
}
#endif

static Tile tile_fast = tile_scalar; /* for D a multiple of 16; tile_scalar for any other D */
/* a block of rows: each key tile converted once (AVX2, D a multiple of 32 up to block_head_dim), else NULL */
static void (*convert_tile)(const uint16_t* k, const uint16_t* v, int n, int D, float* kt, float* vf);
/* With AVX2 up to 64: K and V then fit L1 (2 x 16 KB); at 128 (Llama 3 8B) they do not, and the per-row tiles were
 * faster (+4 to +7 % with blocks, Zen 3). In 16 lanes (AVX-512) blocks win at 128 too: Llama 3 8B's heads, one layer of
 * a 1024-token prompt, -47 and -51 % (in-process A/Bs of two builds, 2 threads, 6 of 6 rounds each, Zen 5). */
static int block_head_dim = 64;
static void (*tile_block)(const float* q, int nq, const float* kt, const float* vf, int n, int D, float* s, Running r);
static void (*to_halves)(const float* x, uint16_t* out, int n) = halves_scalar; /* the cache's new rows */
/* keys a decode split's runs take, about. In 16 lanes a run's keys cost little next to starting it (its first tile
 * comes from memory unprefetched): the chain's decode step at position 1700, lockstep A/Bs of 300 steps, 1024 against
 * 256 -6.4 % (221 of 300), 2048 +1.4 % against 1024; at 600 and 1000 (no split then: 3 tasks on 2 threads) -2.9 and
 * -2.6 %. */
static int split_keys = SPLIT_KEYS;

void attention_use_avx2(void) {
#ifdef HAVE_X86
  tile_fast = tile_avx2;
  convert_tile = convert_tile_avx2;
  tile_block = tile_f32_avx2;
  to_halves = halves_avx2;
#endif
}

void attention_use_avx512(void) {
#ifdef HAVE_X86
  tile_fast = tile_avx512;
  split_keys = 4 * SPLIT_KEYS;
  tile_block = tile_f32_avx512;
  block_head_dim = BLOCK_HEAD_DIM;
#endif
}

/* kv head g of sequence b in a cache [B, G, C, D] */
static inline const uint16_t* cache_head(const AttnJob* j, const uint16_t* cache, int b, int g) {
  return cache + ((size_t)b * j->G + g) * j->C * j->D;
}

/* task i: rows [16i, 16i + 16) rotated; their q into job->q, their k and v into the cache at their positions */
static void rope_task(void* p, size_t i) {
  const AttnJob* j = (const AttnJob*)p;
  const int D = j->D, half = D / 2, W = (j->H + 2 * j->G) * D, rows = j->B * j->S;
  const int r1 = (int)(i + 1) * ROPE_ROWS < rows ? (int)(i + 1) * ROPE_ROWS : rows;
  for (int r = (int)i * ROPE_ROWS; r < r1; r++) {
    const int b = r / j->S, pos = j->seqlens[b] - j->S + 1 + r % j->S;
    const float *x = j->qkv + (size_t)r * W, *cs = j->cos + (size_t)pos * half, *sn = j->sin + (size_t)pos * half;
    for (int h = 0; h < j->H; h++) rotate(x + h * D, cs, sn, half, j->scale, j->q + ((size_t)r * j->H + h) * D);
    for (int g = 0; g < j->G; g++) {
      const size_t at = (((size_t)b * j->G + g) * j->C + pos) * D;
      float k[MAX_HEAD_DIM];
      rotate(x + (j->H + g) * D, cs, sn, half, 1.f, k);
      to_halves(k, j->k + at, D);
      to_halves(x + (j->H + j->G + g) * D, j->v + at, D);
    }
  }
}

/* task i: the q heads of one kv head, for one ROW_BLOCK of one sequence. Tiles of keys outside, rows inside: each
 * tile is read from memory once for all of the block's rows (row by row, a 1024-token prompt read 512 KB of K and V
 * per row and head group, and waited on it). */
static void attend_task(void* p, size_t i) {
  const AttnJob* j = (const AttnJob*)p;
  const int D = j->D, blocks = j->blocks, per = j->H / j->G;
  const int b = (int)(i / ((size_t)j->G * blocks)), g = (int)(i / blocks % j->G), blk = (int)(i % blocks);
  const int s0 = blk * ROW_BLOCK, s1 = s0 + ROW_BLOCK < j->S ? s0 + ROW_BLOCK : j->S;
  const int keys0 = j->seqlens[b] - j->S + 2; /* keys of row 0: positions 0..its own */
  const uint16_t *k = cache_head(j, j->k, b, g), *v = cache_head(j, j->v, b, g);
  const Tile tile = D % 16 ? tile_scalar : tile_fast;
  float scores[4 * KEY_TILE], m[ROW_BLOCK * MAX_GROUP], l[ROW_BLOCK * MAX_GROUP];
  for (int x = 0; x < (s1 - s0) * per; x++) m[x] = -INFINITY, l[x] = 0;
  for (int s = s0; s < s1; s++) memset(j->y + (((size_t)b * j->S + s) * j->H + (size_t)g * per) * D, 0, sizeof(float) * per * D);
  const int once = s1 - s0 > 1 && convert_tile && D % 32 == 0 && D <= block_head_dim;
  /* aligned to cache lines: a tile row's loads then never straddle two (16 B-aligned, a 512-bit load always did) */
  float kt[once ? KEY_TILE * D : 1] __attribute__((aligned(64))), vf[once ? KEY_TILE * D : 1] __attribute__((aligned(64)));
  for (int t = 0; t < keys0 + s1 - 1; t += KEY_TILE) {
    if (once) { /* the block's last row has the most keys of the tile */
      const int last = keys0 + s1 - 1 - t;
      convert_tile(k + (size_t)t * D, v + (size_t)t * D, last < KEY_TILE ? last : KEY_TILE, D, kt, vf);
    }
    int fresh = 1;
    for (int s = s0; s < s1; s++) {
      const int n = keys0 + s - t < KEY_TILE ? keys0 + s - t : KEY_TILE;
      if (n <= 0) continue;
      const size_t at = (((size_t)b * j->S + s) * j->H + (size_t)g * per) * D;
      const int x = (s - s0) * per;
      const Running r = {m + x, l + x, j->y + at};
      if (once)
        tile_block(j->q + at, per, kt, vf, n, D, scores, r);
      else
        tile(j->q + at, per, k + (size_t)t * D, v + (size_t)t * D, n, D, scores, r, fresh);
      fresh = 0;
    }
  }
  for (int s = s0; s < s1; s++)
    for (int h = 0; h < per; h++) {
      float* y = j->y + (((size_t)b * j->S + s) * j->H + (size_t)g * per + h) * D;
      const float inv = 1.f / l[(s - s0) * per + h];
      for (int d = 0; d < D; d++) y[d] *= inv;
    }
}

/* decode (one row a sequence), split over the keys so that both threads work on one session's step: task i takes
 * keys [c * split_keys, (c + 1) * split_keys) of kv head g of sequence b, i = (b * G + g) * splits + c */
static void split_task(void* p, size_t i) {
  const AttnJob* j = (const AttnJob*)p;
  const int D = j->D, per = j->H / j->G, c = (int)(i % j->splits), g = (int)(i / j->splits % j->G);
  const int b = (int)(i / ((size_t)j->splits * j->G)), n = j->seqlens[b] + 1;
  const int k0 = c * j->split_keys, k1 = k0 + j->split_keys < n ? k0 + j->split_keys : n;
  float *m = j->part + i * per * (D + 2), *l = m + per, *y = l + per;
  for (int x = 0; x < per; x++) m[x] = -INFINITY, l[x] = 0;
  memset(y, 0, sizeof(float) * per * D);
  const uint16_t *k = cache_head(j, j->k, b, g), *v = cache_head(j, j->v, b, g);
  const float* q = j->q + ((size_t)b * j->H + (size_t)g * per) * D;
  const Tile tile = D % 16 ? tile_scalar : tile_fast;
  float scores[4 * KEY_TILE];
  for (int t = k0; t < k1; t += KEY_TILE)
    tile(q, per, k + (size_t)t * D, v + (size_t)t * D, k1 - t < KEY_TILE ? k1 - t : KEY_TILE, D, scores,
         (Running){m, l, y}, 1);
}

/* how many runs of keys a decode step's tasks are split into (1: none worth it), and the keys of each run */
static int key_runs(const int32_t* seqlens, int B, int* run_keys) {
  int longest = 0;
  for (int b = 0; b < B; b++) longest = seqlens[b] + 1 > longest ? seqlens[b] + 1 : longest;
  const int runs = (longest + split_keys - 1) / split_keys < MAX_SPLITS ? (longest + split_keys - 1) / split_keys : MAX_SPLITS;
  *run_keys = ((longest + runs - 1) / runs + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
  return runs;
}

/* the split tasks' sums into Y: each rescaled to the largest m of its query */
static void merge_splits(const AttnJob* j) {
  const int D = j->D, per = j->H / j->G, stride = per * (D + 2);
  for (int bg = 0; bg < j->B * j->G; bg++)
    for (int h = 0; h < per; h++) {
      const float* part = j->part + (size_t)bg * j->splits * stride;
      float mx = -INFINITY, sum = 0, w[MAX_SPLITS];
      for (int c = 0; c < j->splits; c++) mx = fmaxf(mx, part[c * stride + h]);
      for (int c = 0; c < j->splits; c++) {
        const float* m = part + c * stride;
        w[c] = m[per + h] > 0 ? expf(m[h] - mx) : 0.f; /* a run past the end of a shorter sequence has no keys */
        sum += w[c] * m[per + h];
      }
      float* y = j->y + ((size_t)bg * per + h) * D; /* row b, q heads of g: (b * G + g) * per */
      for (int d = 0; d < D; d++) {
        float acc = 0;
        for (int c = 0; c < j->splits; c++) acc += w[c] * part[c * stride + 2 * per + h * D + d];
        y[d] = acc / sum;
      }
    }
}

/* the rotated rows' attention: serially below SERIAL_PAIRS (row, key, head) triples, else over the threads, a decode
 * step with too few (sequence, kv head) tasks split over the keys */
static OrtStatus* attend(OrtKernelContext* ctx, AttnJob* j, int64_t pairs) {
  const size_t tasks = (size_t)j->B * j->G * j->blocks;
  if (pairs < SERIAL_PAIRS) {
    for (size_t i = 0; i < tasks; i++) attend_task(j, i);
    return NULL;
  }
  KernelContext_ParallelFor_t parallel_for = (KernelContext_ParallelFor_t)API(KernelContext_ParallelFor);
  if (j->S == 1 && tasks < SPLIT_BELOW) j->splits = key_runs(j->seqlens, j->B, &j->split_keys); /* too few to share */
  if (j->splits <= 1) return parallel_for(ctx, attend_task, tasks, 0, j);
  j->part = (float*)malloc(sizeof(float) * tasks * j->splits * (j->H / j->G) * (j->D + 2));
  if (!j->part) return error(ORT_FAIL, "Attention: out of memory for the split sums");
  OrtStatus* s = parallel_for(ctx, split_task, tasks * j->splits, 0, j);
  if (!s) merge_splits(j);
  free(j->part);
  return s;
}

typedef struct {
  int64_t H, G;
} AttnKernel;

static OrtStatus* fail(const char* msg) { return error(ORT_INVALID_ARGUMENT, msg); }

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const AttnKernel* kn = (const AttnKernel*)kernel;
  const OrtValue *in[6];
  int64_t dims[6][8];
  size_t rank[6];
  char msg[256];
  for (size_t i = 0; i < 6; i++) CHECK(tensor(ctx, i, &in[i], dims[i], &rank[i]));
  const int64_t* kd = dims[1];
  if (rank[1] != 4 || kd[1] != kn->G || kd[3] <= 0 || kd[3] % 2 || kd[3] > MAX_HEAD_DIM) {
    snprintf(msg, sizeof msg, "Attention: past_key must be [batch, kv_num_heads = %lld, context, head_dim (even, at most %d)]",
             (long long)kn->G, MAX_HEAD_DIM);
    return fail(msg);
  }
  const int B = (int)kd[0], G = (int)kn->G, H = (int)kn->H, C = (int)kd[2], D = (int)kd[3];
  if (rank[2] != 4 || memcmp(dims[2], kd, 4 * sizeof(int64_t)))
    return fail("Attention: past_value's shape differs from past_key's");
  if (rank[3] != 1 || dims[3][0] != B) return fail("Attention: seqlens_k must be [batch], batch as past_key's");
  if (rank[0] != 2 || dims[0][1] != (int64_t)(H + 2 * G) * D || (B && dims[0][0] % B)) {
    snprintf(msg, sizeof msg, "Attention: qkv must be [batch * rows, (num_heads + 2 * kv_num_heads) * head_dim = %lld]",
             (long long)(H + 2 * G) * D);
    return fail(msg);
  }
  for (int i = 4; i < 6; i++)
    if (rank[i] != 2 || dims[i][1] != D / 2) return fail("Attention: cos and sin must be [positions, head_dim / 2]");
  const int rows = (int)dims[0][0], S = B ? rows / B : 0;
  const int32_t* seqlens = (const int32_t*)data(in[3]);
  const int64_t limit = C < dims[4][0] ? C : dims[4][0]; /* positions the cache and the rotary tables have */
  for (int b = 0; b < B && S; b++)
    if (seqlens[b] < S - 1 || seqlens[b] >= limit) {
      snprintf(msg, sizeof msg, "Attention: seqlens_k[%d] = %d puts %d new rows at positions outside 0..%lld", b,
               (int)seqlens[b], S, (long long)limit - 1);
      return fail(msg);
    }
  int64_t ydims[2] = {rows, (int64_t)H * D};
  OrtValue *y, *present[2];
  CHECK(((KernelContext_GetOutput_t)API(KernelContext_GetOutput))(ctx, 0, ydims, 2, &y));
  for (int i = 0; i < 2; i++) {
    CHECK(((KernelContext_GetOutput_t)API(KernelContext_GetOutput))(ctx, 1 + i, kd, 4, &present[i]));
    void *dst = data(present[i]), *src = data(in[1 + i]);
    if (dst != src && dst && src) memcpy(dst, src, (size_t)B * G * C * D * sizeof(uint16_t));
  }
  if (rows == 0) return NULL;
  AttnJob j = {(const float*)data(in[0]), (uint16_t*)data(present[0]), (uint16_t*)data(present[1]), seqlens,
               (const float*)data(in[4]), (const float*)data(in[5]), NULL, (float*)data(y), B, S, H, G, D, C,
               (S + ROW_BLOCK - 1) / ROW_BLOCK, 1.f / sqrtf((float)D), 1, 0, NULL};
  float stack[STACK_Q];
  const size_t qn = (size_t)rows * H * D;
  j.q = qn <= STACK_Q ? stack : (float*)malloc(qn * sizeof(float));
  if (!j.q) return error(ORT_FAIL, "Attention: out of memory for the rotated queries");
  int64_t pairs = 0; /* (row, key) pairs, times the heads: the work */
  for (int b = 0; b < B; b++) pairs += (int64_t)S * (seqlens[b] + 1) - (int64_t)S * (S - 1) / 2;
  pairs *= H;
  const size_t rope_tasks = (size_t)(rows + ROPE_ROWS - 1) / ROPE_ROWS;
  OrtStatus* s = NULL;
  if (pairs < SERIAL_PAIRS)
    for (size_t i = 0; i < rope_tasks; i++) rope_task(&j, i);
  else
    s = rope_tasks == 1 ? (rope_task(&j, 0), NULL)
                        : ((KernelContext_ParallelFor_t)API(KernelContext_ParallelFor))(ctx, rope_task, rope_tasks, 0, &j);
  if (!s && B == 1 && S > 1 && S <= EXACT_ROWS) {
    /* A speculative step's token and draft tokens: each row as the decode step of that token alone would run it
     * (a block of rows sums in another order: greedy tokens then part from one-at-a-time decoding at near-ties) */
    for (int r = 0; r < S && !s; r++) {
      const int32_t pos = seqlens[0] - S + 1 + r;
      AttnJob one = j;
      one.S = one.blocks = 1, one.seqlens = &pos, one.q = j.q + (size_t)r * H * D, one.y = j.y + (size_t)r * H * D;
      s = attend(ctx, &one, (int64_t)(pos + 1) * H);
    }
  } else if (!s) {
    s = attend(ctx, &j, pairs);
  }
  if (j.q != stack) free(j.q);
  return s;
}

static OrtStatus* create(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  (void)op, (void)api;
  AttnKernel k;
  KernelInfoGetAttribute_int64_t get = (KernelInfoGetAttribute_int64_t)API(KernelInfoGetAttribute_int64);
  CHECK(get(info, "num_heads", &k.H));
  CHECK(get(info, "kv_num_heads", &k.G));
  if (k.G <= 0 || k.H <= 0 || k.H % k.G || k.H / k.G > MAX_GROUP) {
    char msg[160];
    snprintf(msg, sizeof msg, "Attention: num_heads = %lld must be a positive multiple of kv_num_heads = %lld (at most %d times)",
             (long long)k.H, (long long)k.G, MAX_GROUP);
    return error(ORT_INVALID_ARGUMENT, msg);
  }
  AttnKernel* p = (AttnKernel*)malloc(sizeof *p);
  if (!p) return error(ORT_FAIL, "Attention: out of memory");
  *p = k;
  *out = p;
  return NULL;
}

static const char* name(const struct OrtCustomOp* op) { (void)op; return "Attention"; }
static const char* provider(const struct OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const struct OrtCustomOp* op, size_t i) {
  (void)op;
  return i == 3 ? TYPE_INT32 : i == 1 || i == 2 ? TYPE_FLOAT16 : TYPE_FLOAT;
}
static size_t input_count(const struct OrtCustomOp* op) { (void)op; return 6; }
static int output_type(const struct OrtCustomOp* op, size_t i) { (void)op; return i ? TYPE_FLOAT16 : TYPE_FLOAT; }
static size_t output_count(const struct OrtCustomOp* op) { (void)op; return 3; }
static void destroy(void* kernel) { free(kernel); }
static int required(const struct OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int memory_default(const struct OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int arity_one(const struct OrtCustomOp* op) { (void)op; return 1; }

const OrtCustomOp attention_op = {
    CUSTOM_OP_VERSION, NULL, name, provider, input_type, input_count, output_type, output_count, NULL,
    destroy, required, required, memory_default, arity_one, arity_one, arity_one, arity_one, create, compute,
};
