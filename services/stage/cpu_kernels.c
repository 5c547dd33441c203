/* splitllm's CPU kernels, an ONNX Runtime custom op library (SessionOptions.register_custom_ops_library).
 *
 * ai.splitllm MatMulQ4_1(A float [..., K], qs uint8 [N, K/2], d float16 [N, K/32], m float16 [N, K/32]) -> Y [..., N]
 *     Y = A @ W.T with W[n, 32b + j] = d[n, b] * code[n, b, j] + m[n, b]     (GGUF's Q4_1, exactly)
 *     qs holds block b of row n in bytes [16b, 16b + 16): code j < 16 in the low nibble of byte j, code j + 16
 *     in its high nibble (GGUF's order). d and m may also be zero-padded to nbp = a multiple of 8 blocks (artifacts
 *     exported before 2026-12-07 are): 6 % more bytes a row at K = 576, and decode streams its weights.
 *     Attribute swiglu = 1: W stacks a gate and an up projection (N/2 rows each) and Y [..., N/2] = silu(gate) * up,
 *     the MLP's activation in the same pass (three graph nodes fewer a layer).
 *
 * ai.splitllm MatMulQ8_0(A float [..., K], qs int8 [N, 64 * pairs], d float16 [N, K/32 or nbp]) -> Y [..., N]
 *     W[n, 32b + j] = d[n, b] * q[n, b, j]                                   (GGUF's Q8_0, exactly)
 *     qs in A's pair order (below): per pair of blocks, the first halves of both blocks, then their second halves;
 *     an odd K / 32 pads the last pair with a zero block. (SmolLM2's tied lm_head: read in place, where MatMulNBits
 *     kept a prepacked copy of its 30 MB on the heap.)
 *
 * Why a kernel of our own: ONNX Runtime's MatMulNBits cannot express Q4_1's minimum (not an integer number of
 * steps), so the graph added it as a second Gemm over the input's block sums; that term cost a third of a
 * decode step. Here it is one FMA per 8 blocks. A is quantized per block of 32 to int8 (as MatMulNBits does
 * at accuracy level 4); each block's dot product is exact in int32, scaled by d * dA, plus m * dA * sum(q), the sum
 * of the block's rounded values (as llama.cpp's Q8_1 keeps it): the result is then W exactly against A rounded, an
 * error in proportion to W. With A's exact sums it would be d * sum(code * rounding error), codes 0..15 instead of
 * W's centred values: 2.5-3x the error.
 *
 * ai.splitllm Attention: cpu_attention.c. This file registers every op (RegisterCustomOps, at the end).
 */
#include "cpu_kernels.h"

const OrtApi* g_api;

/* ---------------------------------------------------------------- the math */

/* One row of A, quantized: for each group of G blocks (G = 2 for the AVX2 and portable kernels, 4 for AVX-512), 16 *
 * G int8 of their first halves (block by block), then 16 * G of their second halves (the order the weights' low and
 * high nibbles come in); then dA [nbp] and dA * sum(q) [nbp]; then dA of each block four times, the lanes a block's
 * int32 sums come in. A last group that K / 32 does not fill is padded with zeros. */
typedef struct {
  int K, nb, nbp, pairs; /* pairs: Q8_0's weight rows hold (nb + 1) / 2 pairs of blocks, whatever G */
  int group, groups;     /* G, and the groups of a row: (nb + G - 1) / G */
  size_t stride;         /* bytes per quantized row */
  int ws;                /* the weights' d (and m) per row: nb, or nbp where they are padded */
} Layout;

static int a_group = 2; /* G of the kernels this process runs (pick_kernels) */

static Layout layout(int K) {
  Layout l;
  l.K = K;
  l.nb = K / 32;
  l.nbp = (l.nb + 7) & ~7;
  l.pairs = (l.nb + 1) / 2;
  l.group = a_group;
  l.groups = (l.nb + l.group - 1) / l.group;
  const size_t blocks = (size_t)l.groups * l.group;
  l.stride = blocks * 32 + (size_t)l.nbp * 8 + blocks * 16;
  l.ws = l.nbp;
  return l;
}

static inline float* row_scales(uint8_t* row, const Layout* l) {
  return (float*)(row + (size_t)l->groups * l->group * 32);
}

/* block b's first half in a quantized row (its second half is 16 * G bytes further on) */
static inline size_t first_half(int b, const Layout* l) {
  return (size_t)(b / l->group) * 32 * l->group + (size_t)(b % l->group) * 16;
}

static void expand_scales(float* dA, const Layout* l) { /* dA [nbp] is zero past nb: a last group's padding */
  float* lanes = dA + 2 * l->nbp;
  for (int b = 0; b < l->groups * l->group; b++)
    for (int j = 0; j < 4; j++) lanes[4 * b + j] = dA[b];
}

static void quantize_row_scalar(const float* a, const Layout* l, uint8_t* out) {
  int8_t* q = (int8_t*)out;
  float *dA = row_scales(out, l), *sA = dA + l->nbp;
  memset(out, 0, l->stride);
  for (int b = 0; b < l->nb; b++) {
    const float* v = a + 32 * b;
    float amax = 0;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
    float inv = amax > 0 ? 127.f / amax : 0.f;
    int8_t* half = q + first_half(b, l);
    const int second = 16 * l->group;
    int sum = 0;
    for (int j = 0; j < 16; j++) {
      half[j] = (int8_t)nearbyintf(v[j] * inv);
      half[second + j] = (int8_t)nearbyintf(v[16 + j] * inv);
      sum += half[j] + half[second + j];
    }
    dA[b] = amax / 127.f;
    sA[b] = dA[b] * (float)sum;
  }
  expand_scales(dA, l);
}

/* rows [n0, n1) of W against `count` quantized rows of A (consecutive, `l->stride` apart); Y row r at y + r*ldy.
 * q4: Q4_1 weights (nibbles in GGUF's order, the m term), else Q8_0 (bytes in A's pair order). */
static void rows_scalar(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int n0, int n1, const uint8_t* aq,
                        int count, const Layout* l, float* y, size_t ldy, int q4) {
  const size_t row_bytes = q4 ? (size_t)l->nb * 16 : (size_t)l->pairs * 64;
  for (int r = 0; r < count; r++) {
    const uint8_t* row = aq + (size_t)r * l->stride;
    const int8_t* q = (const int8_t*)row;
    const float *dA = row_scales((uint8_t*)row, l), *sA = dA + l->nbp;
    for (int n = n0; n < n1; n++) {
      const uint8_t* wq = qs + (size_t)n * row_bytes;
      float acc = 0;
      for (int b = 0; b < l->nb; b++) {
        const int8_t* a = q + first_half(b, l);
        const int second = 16 * l->group;
        int32_t dot = 0;
        for (int j = 0; j < 16; j++) {
          if (q4) {
            dot += (wq[16 * b + j] & 0x0F) * a[j] + (wq[16 * b + j] >> 4) * a[second + j];
          } else { /* Q8_0's weights: pairs of blocks, the first halves of both, then their second halves */
            const int8_t* w = (const int8_t*)wq + (b / 2) * 64 + (b & 1) * 16;
            dot += w[j] * a[j] + w[32 + j] * a[second + j];
          }
        }
        acc += half_to_float(d[(size_t)n * l->ws + b]) * dA[b] * (float)dot;
        if (q4) acc += half_to_float(m[(size_t)n * l->ws + b]) * sA[b];
      }
      y[(size_t)r * ldy + n] = acc;
    }
  }
}

static void rows_Q4_1_scalar(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int n0, int n1,
                             const uint8_t* aq, int count, const Layout* l, float* y, size_t ldy) {
  rows_scalar(qs, d, m, n0, n1, aq, count, l, y, ldy, 1);
}

static void rows_Q8_0_scalar(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int n0, int n1,
                             const uint8_t* aq, int count, const Layout* l, float* y, size_t ldy) {
  rows_scalar(qs, d, m, n0, n1, aq, count, l, y, ldy, 0);
}

/* y[i] = silu(g[i]) * u[i] */
static void swiglu_scalar(const float* g, const float* u, float* y, int n) {
  for (int i = 0; i < n; i++) y[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

#ifdef HAVE_X86

AVX2 static void quantize_row_avx2(const float* a, const Layout* l, uint8_t* out) {
  int8_t* q = (int8_t*)out;
  float *dA = row_scales(out, l), *sA = dA + l->nbp;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  if (l->nb % l->group) memset(q + (size_t)(l->nb / l->group) * 32 * l->group, 0, 32 * (size_t)l->group);
  for (int b = l->nb; b < l->nbp; b++) dA[b] = sA[b] = 0;
  for (int b = 0; b < l->nb; b++) {
    const float* v = a + 32 * b;
    __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
           v3 = _mm256_loadu_ps(v + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    dA[b] = amax / 127.f;
    __m256 inv = _mm256_set1_ps(amax > 0 ? 127.f / amax : 0.f);
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    __m256i isum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    sA[b] = dA[b] * (float)_mm_cvtsi128_si32(s);
    __m256i packed = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)), order);
    int8_t* half = q + first_half(b, l);
    _mm_storeu_si128((__m128i*)half, _mm256_castsi256_si128(packed));
    _mm_storeu_si128((__m128i*)(half + 16 * l->group), _mm256_extracti128_si256(packed, 1));
  }
  expand_scales(dA, l);
}

/* weight rows ahead that a row kernel asks the cache for. Zen 3 (bench/kernel_ab.py, 30 layers, one row): 4 and 8 rows
 * ahead 10 % faster than none, 16 slower. Zen 5, where the AVX-512 kernels consume rows faster than DRAM answers 4
 * rows ahead (1.4 KB at K = 576): 8 against 4 -8.0 % (46 of 60 rounds; AVX2 kernels -2.1 %), several rows of A
 * unchanged; the chain's decode step -5.1 % paired (bench/env_ab.py, 16 of 20), the pipeline's TPOT -9.2 % paired
 * (bench/pipeline_ab.py, 37 of 40). 12 against 8: -4.9 % (23 of 40) alone, the chain's decode -0.8 % (10 of 20). */
enum { PREFETCH_ROWS = 8 };

/* weight rows n + PREFETCH_ROWS .. n + PREFETCH_ROWS + count - 1 (those before n1) asked for in the cache: their codes,
 * d and (Q4_1: wm not NULL) m; wq, wd and wm are row n's. Always inlined: GCC finds that a call of it changes nothing
 * and drops the call (the one-row kernels ran without prefetches, 1.6-1.9x slower from memory). */
static inline __attribute__((always_inline)) void prefetch_ahead(const uint8_t* wq, const uint16_t* wd,
                                                                 const uint16_t* wm, size_t row_bytes, size_t ws,
                                                                 int n, int n1, int count) {
  for (int r = 0; r < count; r++)
    if (n + r + PREFETCH_ROWS < n1) {
      const size_t ahead = (size_t)(PREFETCH_ROWS + r) * row_bytes;
      for (size_t c = 0; c < row_bytes; c += 64) _mm_prefetch((const char*)(wq + ahead + c), _MM_HINT_T0);
      _mm_prefetch((const char*)(wd + (PREFETCH_ROWS + r) * ws), _MM_HINT_T0);
      if (wm) _mm_prefetch((const char*)(wm + (PREFETCH_ROWS + r) * ws), _MM_HINT_T0);
    }
}

/* 8 of a weight row's d (or m) as floats, `left` of them in the row: zeros past its end, as padded scales would be
 * (the row's last group of fewer than 8 blocks; a plain load would read the next row's, or past the tensor) */
AVX2 static inline __m256 load_scales(const uint16_t* p, int left) {
  if (left >= 8) return LOAD_HALVES(p);
  uint16_t tail[8] = {0};
  memcpy(tail, p, (size_t)left * sizeof *p);
  return LOAD_HALVES(tail);
}

static const int32_t PAIR_LANES[4][8] __attribute__((aligned(32))) = {
    {0, 0, 0, 0, 1, 1, 1, 1}, {2, 2, 2, 2, 3, 3, 3, 3}, {4, 4, 4, 4, 5, 5, 5, 5}, {6, 6, 6, 6, 7, 7, 7, 7}};

/* R rows of A at once (1 to 4), each pair of weight blocks loaded (and unpacked) once for all of them. Per pair:
 * Q4_1: the two blocks' 32 low and 32 high nibbles against A's matching halves (maddubs, int16 sums of at most
 *       4 * 15 * 127);
 * Q8_0: signed by signed bytes as maddubs(|w|, a * sign(w)) (pairs of at most 2 * 128 * 127, so each half is widened
 *       to int32 before the two are added);
 * then 8 int32 lanes, 0-3 block 2p and 4-7 block 2p+1, each scaled by its block's d * dA (d spread to the lanes once
 * per pair for every row, dA spread already in A's layout). All lanes are summed at the end, so Q4_1's m * dA * sum(q)
 * term goes into an accumulator too. Two accumulators per row (even and odd pairs), so that the FMAs' latency does not
 * bound the loop. A row's arithmetic is the same whatever R, so a row's result does not depend on how many rows run
 * with it (a session decodes the same alone and in a batch). */
/* One pair of weight blocks against one row of A (its 64 quantized values at A), the 8 int32 lanes scaled by S (each
 * block's d * dA) into ACC. Q4_1: LO and HI are the pair's low and high nibbles; Q8_0: W0 and W1 its first and
 * second halves, U0 and U1 their absolute values. The several-row and the one-row kernels both run these. */
#define DOT_Q4_1(LO, HI, A, S, ACC)                                                                                   \
  ACC = _mm256_fmadd_ps(                                                                                              \
      S,                                                                                                              \
      _mm256_cvtepi32_ps(_mm256_madd_epi16(                                                                           \
          _mm256_add_epi16(_mm256_maddubs_epi16(LO, _mm256_loadu_si256((const __m256i*)(A))),                         \
                           _mm256_maddubs_epi16(HI, _mm256_loadu_si256((const __m256i*)((A) + 32)))),                 \
          ones)),                                                                                                     \
      ACC)

#define DOT_Q8_0(W0, U0, W1, U1, A, S, ACC)                                                                           \
  ACC = _mm256_fmadd_ps(                                                                                              \
      S,                                                                                                              \
      _mm256_cvtepi32_ps(_mm256_add_epi32(                                                                            \
          _mm256_madd_epi16(_mm256_maddubs_epi16(U0, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(A)), W0)),  \
                            ones),                                                                                    \
          _mm256_madd_epi16(                                                                                          \
              _mm256_maddubs_epi16(U1, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)((A) + 32)), W1)), ones))), \
      ACC)

#define PAIR_Q4_1(P, ACC)                                                                                             \
  do {                                                                                                                \
    const int pr = g / 2 + (P);                                                                                       \
    __m256i w = 2 * pr + 1 == nb /* odd K / 32: the last pair has one block */                                        \
                    ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(wq + pr * 32)))                         \
                    : _mm256_loadu_si256((const __m256i*)(wq + pr * 32));                                             \
    __m256i lo = _mm256_and_si256(w, low4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);                     \
    const __m256 Dp = _mm256_permutevar8x32_ps(D, _mm256_load_si256((const __m256i*)PAIR_LANES[P]));                  \
    for (int r = 0; r < ROWS; r++)                                                                                    \
      DOT_Q4_1(lo, hi, q[r] + pr * 64, _mm256_mul_ps(Dp, _mm256_loadu_ps(dAx[r] + pr * 8)), ACC[r]);                  \
  } while (0)

#define PAIR_Q8_0(P, ACC)                                                                                             \
  do {                                                                                                                \
    const int pr = g / 2 + (P);                                                                                       \
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)(wq + pr * 64));                                            \
    const __m256i w1 = _mm256_loadu_si256((const __m256i*)(wq + pr * 64 + 32));                                       \
    const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);                                                 \
    const __m256 Dp = _mm256_permutevar8x32_ps(D, _mm256_load_si256((const __m256i*)PAIR_LANES[P]));                  \
    for (int r = 0; r < ROWS; r++)                                                                                    \
      DOT_Q8_0(w0, u0, w1, u1, q[r] + pr * 64, _mm256_mul_ps(Dp, _mm256_loadu_ps(dAx[r] + pr * 8)), ACC[r]);          \
  } while (0)

/* rows_q4_1_R / rows_q8_0_R: weight rows n0..n1 against R quantized rows of A; KIND is Q4_1 or Q8_0 */
#define DEFINE_ROWS(KIND, R)                                                                                          \
  AVX2 static void rows_##KIND##_##R(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int n0, int n1,         \
                                     const uint8_t* aq, const Layout* l, float* y, size_t ldy) {                      \
    enum { ROWS = R, Q4 = IS_##KIND };                                                                                \
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);                                         \
    const int nb = l->nb, nbp = l->nbp, ws = l->ws;                                                                   \
    const size_t row_bytes = Q4 ? (size_t)nb * 16 : (size_t)l->pairs * 64;                                           \
    const int8_t* q[R];                                                                                               \
    const float *sA[R], *dAx[R];                                                                                      \
    (void)low4;                                                                                                       \
    for (int r = 0; r < R; r++) {                                                                                     \
      const uint8_t* row = aq + (size_t)r * l->stride;                                                                \
      q[r] = (const int8_t*)row;                                                                                      \
      sA[r] = row_scales((uint8_t*)row, l) + nbp;                                                                     \
      dAx[r] = sA[r] + nbp;                                                                                           \
    }                                                                                                                 \
    for (int n = n0; n < n1; n++) {                                                                                   \
      const uint8_t* wq = qs + (size_t)n * row_bytes;                                                                 \
      const uint16_t* wd = d + (size_t)n * ws;                                                                        \
      prefetch_ahead(wq, wd, Q4 ? m + (size_t)n * ws : NULL, row_bytes, ws, n, n1, 1);                                \
      __m256 even[R], odd[R];                                                                                         \
      for (int r = 0; r < R; r++) even[r] = odd[r] = _mm256_setzero_ps();                                            \
      for (int g = 0; g < nb; g += 8) {                                                                               \
        __m256 D = load_scales(wd + g, ws - g);                                                                       \
        if (Q4) {                                                                                                     \
          __m256 M = load_scales(m + (size_t)n * ws + g, ws - g);                                                     \
          for (int r = 0; r < R; r++) odd[r] = _mm256_fmadd_ps(M, _mm256_loadu_ps(sA[r] + g), odd[r]);                \
        }                                                                                                             \
        if (nb - g >= 8) {                                                                                            \
          PAIR_##KIND(0, even);                                                                                       \
          PAIR_##KIND(1, odd);                                                                                        \
          PAIR_##KIND(2, even);                                                                                       \
          PAIR_##KIND(3, odd);                                                                                        \
        } else {                                                                                                      \
          const int pairs = (nb - g + 1) / 2;                                                                         \
          PAIR_##KIND(0, even);                                                                                       \
          if (pairs > 1) PAIR_##KIND(1, odd);                                                                         \
          if (pairs > 2) PAIR_##KIND(2, even);                                                                        \
          if (pairs > 3) PAIR_##KIND(3, odd);                                                                         \
        }                                                                                                             \
      }                                                                                                               \
      for (int r = 0; r < R; r++) {                                                                                   \
        __m256 acc = _mm256_add_ps(even[r], odd[r]);                                                                  \
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));                            \
        s = _mm_hadd_ps(s, s);                                                                                        \
        s = _mm_hadd_ps(s, s);                                                                                        \
        y[(size_t)r * ldy + n] = _mm_cvtss_f32(s);                                                                    \
      }                                                                                                               \
    }                                                                                                                 \
  }

/* One row of A (a decode step): the arithmetic of rows_KIND_R for each row, in the same order and with the same
 * products, so a row's result is the same bits; but each pair's loads are at constant offsets from its group of 8
 * blocks, and d * dA is multiplied once per group (then spread to each pair's lanes) instead of once per pair. With
 * DEFINE_ROWS at one row, the index arithmetic of each pair and its test for an odd K / 32's single last block made
 * the step wait on instruction dispatch, not on its vector units (llvm-mca, Zen 3). Standalone, weights in L1 (3.2
 * GHz): 7.0 -> 6.4 cycles a pair at K = 576, 5.6 -> 5.1 at K = 1536. */
#define ONE_Q4_1(WG, AG, DA, P, ACC, SINGLE)                                                                          \
  do {                                                                                                                \
    const __m256i w = (SINGLE) ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)((WG) + 32 * (P))))          \
                               : _mm256_loadu_si256((const __m256i*)((WG) + 32 * (P)));                               \
    const __m256i lo = _mm256_and_si256(w, low4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);              \
    DOT_Q4_1(lo, hi, (AG) + 64 * (P),                                                                                 \
             _mm256_permutevar8x32_ps(DA, _mm256_load_si256((const __m256i*)PAIR_LANES[P])), ACC);                    \
  } while (0)

#define ONE_Q8_0(WG, AG, DA, P, ACC, SINGLE) /* Q8_0's layout pads a single last block with a zero one */             \
  do {                                                                                                                \
    const __m256i w0 = _mm256_loadu_si256((const __m256i*)((WG) + 64 * (P)));                                         \
    const __m256i w1 = _mm256_loadu_si256((const __m256i*)((WG) + 64 * (P) + 32));                                    \
    DOT_Q8_0(w0, _mm256_abs_epi8(w0), w1, _mm256_abs_epi8(w1), (AG) + 64 * (P),                                       \
             _mm256_permutevar8x32_ps(DA, _mm256_load_si256((const __m256i*)PAIR_LANES[P])), ACC);                    \
    (void)(SINGLE);                                                                                                   \
  } while (0)

/* The sums of one or two weight rows' accumulators, each reduced to [a0 a1 a2 a3], into y[0] (and y[1]): two rows as
 * [a0 + a1, a2 + a3, b0 + b1, b2 + b3], then each row's two halves, so that a row's sum is the one it has alone. */
AVX2 static inline void store_sums(const __m128* s, int rows, float* y) {
  const __m128 h = _mm_hadd_ps(s[0], rows == 2 ? s[1] : s[0]);
  if (rows == 2)
    _mm_storel_pi((__m64*)y, _mm_hadd_ps(h, h));
  else
    y[0] = _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

/* Two weight rows at a time up to this many blocks a row (K = 768): a short row's sum at its end had the core wait
 * (standalone, weights in L1: K = 576 -16 %, but K = 1536 +7 %, so longer rows go one at a time; SmolLM2's stage 2
 * decode step -2.2 / -2.8 / -3.0 % in three lockstep A/Bs of 600 steps, where an A/A gives -0.2 %). */
enum { TWO_ROWS_MAX_BLOCKS = 24 };

/* what a one-row kernel (one_KIND, one512_KIND) starts with: A's codes q, scales dA and sums sA; weight row n's codes
 * wq, d and m (wd, wm); the next rows asked for */
#define ONE_ROW_START                                                                                                 \
  const size_t nb = (size_t)l->nb, nbp = (size_t)l->nbp, ws = (size_t)l->ws;                                          \
  const size_t row_bytes = Q4 ? nb * 16 : (size_t)l->pairs * 64;                                                      \
  const int8_t* q = (const int8_t*)aq;                                                                                \
  const float *dA = row_scales((uint8_t*)aq, l), *sA = dA + nbp;                                                      \
  const uint8_t* wq = qs + (size_t)n * row_bytes;                                                                     \
  const uint16_t *wd = d + (size_t)n * ws, *wm = Q4 ? m + (size_t)n * ws : NULL;                                      \
  prefetch_ahead(wq, wd, wm, row_bytes, ws, n, n1, ROWS)

/* NAME: weight rows n0..n1 against one row of A, by ONE (two weight rows at a time while the rows are short) */
#define DEFINE_ONE_ROWS(TARGET, NAME, ONE)                                                                            \
  TARGET static void NAME(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int n0, int n1, const uint8_t* aq,  \
                          const Layout* l, float* y) {                                                                \
    int n = n0;                                                                                                       \
    if (l->nb <= TWO_ROWS_MAX_BLOCKS)                                                                                 \
      for (; n + 2 <= n1; n += 2) ONE(qs, d, m, n, n1, aq, l, y, 2);                                                  \
    for (; n < n1; n++) ONE(qs, d, m, n, n1, aq, l, y, 1);                                                            \
  }

/* pair P of the group for each of the ROWS weight rows */
#define ONE_PAIR(KIND, P, ACC, SINGLE)                                                                                \
  for (int r = 0; r < ROWS; r++) ONE_##KIND(wg[r], ag, DA[r], P, ACC[r], SINGLE)

/* one_KIND: weight rows n .. n + ROWS - 1 (ROWS 1 or 2, a constant in each copy) */
#define DEFINE_ONE(KIND)                                                                                              \
  AVX2 static inline __attribute__((always_inline)) void one_##KIND(const uint8_t* qs, const uint16_t* d,            \
                                                                    const uint16_t* m, int n, int n1,                 \
                                                                    const uint8_t* aq, const Layout* l, float* y,     \
                                                                    const int ROWS) {                                 \
    enum { Q4 = IS_##KIND, PAIR_BYTES = Q4 ? 32 : 64 };                                                               \
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);                                         \
    (void)low4;                                                                                                       \
    ONE_ROW_START;                                                                                                    \
    const size_t full = nb & ~(size_t)7;                                                                              \
    __m256 even[2], odd[2];                                                                                           \
    for (int r = 0; r < ROWS; r++) even[r] = odd[r] = _mm256_setzero_ps();                                           \
    for (size_t g = 0; g < nb; g += 8) {                                                                              \
      const uint8_t* wg[2];                                                                                           \
      __m256 DA[2];                                                                                                   \
      const int8_t* ag = q + 32 * g;                                                                                  \
      for (int r = 0; r < ROWS; r++) {                                                                                \
        wg[r] = wq + r * row_bytes + g / 2 * PAIR_BYTES;                                                              \
        DA[r] = _mm256_mul_ps(load_scales(wd + r * ws + g, (int)(ws - g)),                                            \
                              _mm256_loadu_ps(dA + g));                                                               \
        if (Q4) odd[r] = _mm256_fmadd_ps(load_scales(wm + r * ws + g, (int)(ws - g)),                                 \
                                         _mm256_loadu_ps(sA + g), odd[r]);                                            \
      }                                                                                                               \
      if (g < full) {                                                                                                 \
        ONE_PAIR(KIND, 0, even, 0);                                                                                   \
        ONE_PAIR(KIND, 1, odd, 0);                                                                                    \
        ONE_PAIR(KIND, 2, even, 0);                                                                                   \
        ONE_PAIR(KIND, 3, odd, 0);                                                                                    \
      } else { /* the last 1 to 7 blocks */                                                                           \
        const size_t rest = nb - g, pairs = (rest + 1) / 2, single = rest & 1;                                        \
        ONE_PAIR(KIND, 0, even, single && pairs == 1);                                                                \
        if (pairs > 1) ONE_PAIR(KIND, 1, odd, single && pairs == 2);                                                  \
        if (pairs > 2) ONE_PAIR(KIND, 2, even, single && pairs == 3);                                                 \
        if (pairs > 3) ONE_PAIR(KIND, 3, odd, single);                                                                \
      }                                                                                                               \
    }                                                                                                                 \
    __m128 s[2];                                                                                                      \
    for (int r = 0; r < ROWS; r++) {                                                                                  \
      const __m256 acc = _mm256_add_ps(even[r], odd[r]);                                                              \
      s[r] = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));                                  \
    }                                                                                                                 \
    store_sums(s, ROWS, y + n);                                                                                       \
  }                                                                                                                   \
  DEFINE_ONE_ROWS(AVX2, rows_##KIND##_one, one_##KIND)
#define IS_Q4_1 1
#define IS_Q8_0 0
DEFINE_ONE(Q4_1)
DEFINE_ONE(Q8_0)

/* NAME: any count of A rows, 4 at a time, by PARTS_4, _3, _2 and _one */
#define DEFINE_ANY_ROWS(NAME, PARTS)                                                                                  \
  static void NAME(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int n0, int n1, const uint8_t* aq,        \
                   int count, const Layout* l, float* y, size_t ldy) {                                                \
    for (; count >= 4; count -= 4, aq += 4 * l->stride, y += 4 * ldy) PARTS##_4(qs, d, m, n0, n1, aq, l, y, ldy);    \
    if (count == 3) PARTS##_3(qs, d, m, n0, n1, aq, l, y, ldy);                                                       \
    if (count == 2) PARTS##_2(qs, d, m, n0, n1, aq, l, y, ldy);                                                       \
    if (count == 1) PARTS##_one(qs, d, m, n0, n1, aq, l, y);                                                          \
  }

/* rows_q4_1_avx2 / rows_q8_0_avx2: any count of A rows */
#define DEFINE_KIND(KIND)                                                                                             \
  DEFINE_ROWS(KIND, 2)                                                                                                \
  DEFINE_ROWS(KIND, 3)                                                                                                \
  DEFINE_ROWS(KIND, 4)                                                                                                \
  DEFINE_ANY_ROWS(rows_##KIND##_avx2, rows_##KIND)
DEFINE_KIND(Q4_1)
DEFINE_KIND(Q8_0)

AVX2 static void swiglu_avx2(const float* g, const float* u, float* y, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(g + i);
    __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), x));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                          _mm256_loadu_ps(u + i)));
  }
  swiglu_scalar(g + i, u + i, y + i, n - i);
}

/* ---------------------------------------------------------------- AVX-512 with VNNI */

/* vpdpbusd adds 4 products of unsigned by signed bytes into each int32 lane: one instruction where AVX2 takes maddubs,
 * an add and madd, on 512 bits. A's groups are of 4 blocks here (a quad): 64 bytes of their first halves, then 64 of
 * their second halves, so a quad of Q4_1 weights (64 bytes, low nibbles the first halves, high nibbles the second)
 * goes against a row of A in two of them. Lanes 0-7 of the result are then the AVX2 kernel's pair 2q and lanes 8-15
 * its pair 2q + 1, with the same int32 sums; they are scaled and added in the AVX2 kernel's order (an accumulator's low
 * half is its even accumulator, the high half its odd one), so a row's result is the AVX2 kernel's, bit for bit.
 * Q8_0 is signed by signed: |w| against a negated where w < 0 (A's codes are within +-127). */

static const int32_t QUAD_LANES[2][16] __attribute__((aligned(64))) = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3}, {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7}};

AVX512 static inline __m512i negate_where(__m512i a, __mmask64 negative) {
  return _mm512_mask_sub_epi8(a, negative, _mm512_setzero_si512(), a);
}

/* The weights of one quad, ready for DOT512: Q4_1's low and high nibbles (X, Y) from its 64 bytes at W, of which the
 * first 16 * BLOCKS are the row's; Q8_0's first and second halves as |w| (X, Y) and their signs (SX, SY), from the
 * (BLOCKS + 1) / 2 pairs at W (Q8_0's rows are padded to whole pairs). */
#define QUAD_Q4_1(W, BLOCKS)                                                                                          \
  const __m512i w_ = (BLOCKS) == 4 ? _mm512_loadu_si512((const void*)(W))                                             \
                                   : _mm512_maskz_loadu_epi8((__mmask64)((1ULL << (16 * (BLOCKS))) - 1), (W));        \
  const __m512i X = _mm512_and_si512(w_, low4), Y = _mm512_and_si512(_mm512_srli_epi16(w_, 4), low4);                 \
  const __mmask64 SX = 0, SY = 0;                                                                                     \
  (void)SX;                                                                                                           \
  (void)SY

#define QUAD_Q8_0(W, BLOCKS)                                                                                          \
  const __m512i z0_ = _mm512_loadu_si512((const void*)(W)),                                                           \
                z1_ = (BLOCKS) > 2 ? _mm512_loadu_si512((const void*)((W) + 64)) : _mm512_setzero_si512();            \
  const __m512i wx_ = _mm512_shuffle_i64x2(z0_, z1_, 0x44), wy_ = _mm512_shuffle_i64x2(z0_, z1_, 0xEE);               \
  const __m512i X = _mm512_abs_epi8(wx_), Y = _mm512_abs_epi8(wy_);                                                   \
  const __mmask64 SX = _mm512_movepi8_mask(wx_), SY = _mm512_movepi8_mask(wy_)

/* the quad's 16 int32 lanes against one row of A (its 128 quantized values at A), as floats */
#define DOT512(KIND, A)                                                                                               \
  _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), X, A_HALF(KIND, A, SX)), Y,       \
                                         A_HALF(KIND, (A) + 64, SY)))
/* 64 bytes of A, negated where Q8_0's weights are (SIGNS) */
#define A_HALF(KIND, P, SIGNS)                                                                                        \
  (IS_##KIND ? _mm512_loadu_si512((const void*)(P)) : negate_where(_mm512_loadu_si512((const void*)(P)), SIGNS))

/* Q4_1's m * dA * sum(q) term of 8 blocks into an accumulator's high half (the AVX2 kernel's odd accumulator) */
#define M_TERM512(M, SA, ACC)                                                                                         \
  ACC = _mm512_mask3_fmadd_ps(_mm512_broadcast_f32x8(M), _mm512_broadcast_f32x8(SA), ACC, (__mmask16)0xFF00)

/* load_scales by a masked load: the several-row kernel takes a row's last group per weight row, and its zeroed copy
 * made a 128-row product 8.9 % slower (`bench/kernel_ab.py --rows 1,32,128`, 24 rounds; one row within the noise) */
AVX512 static inline __m256 load_scales512(const uint16_t* p, int left) {
  if (left >= 8) return LOAD_HALVES(p);
  return _mm256_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << left) - 1), p));
}

/* the sum of an accumulator's lanes, as the AVX2 kernel sums its even and odd ones */
AVX512 static inline __m128 halves512(__m512 acc) {
  const __m256 s = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* rows512_KIND_R: weight rows n0..n1 against R quantized rows of A (rows_KIND_R's arithmetic). Every load of A is at
 * a constant offset from the group's pointers plus r * stride: with a pointer per row of A (three per row: its codes,
 * sums and scales) the loop ran out of registers and spent its time moving addresses (2.5x the vector work). */
#define DEFINE_ROWS512(KIND, R)                                                                                       \
  AVX512 static void rows512_##KIND##_##R(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int n0, int n1,   \
                                          const uint8_t* aq, const Layout* l, float* y, size_t ldy) {                 \
    enum { ROWS = R, Q4 = IS_##KIND, QUAD_BYTES = Q4 ? 64 : 128 };                                                    \
    const __m512i low4 = _mm512_set1_epi8(0x0F);                                                                      \
    const int nb = l->nb, nbp = l->nbp, ws = l->ws;                                                                   \
    const size_t row_bytes = Q4 ? (size_t)nb * 16 : (size_t)l->pairs * 64, stride = l->stride;                        \
    const uint8_t* sums = (const uint8_t*)(row_scales((uint8_t*)aq, l) + nbp); /* sA of row 0, then its lanes */      \
    const uint8_t* lanes = sums + 4 * (size_t)nbp;                                                                    \
    (void)low4;                                                                                                       \
    for (int n = n0; n < n1; n++) {                                                                                   \
      const uint8_t* wq = qs + (size_t)n * row_bytes;                                                                 \
      const uint16_t* wd = d + (size_t)n * ws;                                                                        \
      prefetch_ahead(wq, wd, Q4 ? m + (size_t)n * ws : NULL, row_bytes, ws, n, n1, 1);                                \
      __m512 acc[R];                                                                                                  \
      for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                                       \
      for (int g = 0; g < nb; g += 8) {                                                                               \
        const uint8_t *ag = aq + 32 * (size_t)g, *lg = lanes + 16 * (size_t)g, *wg = wq + (size_t)g / 4 * QUAD_BYTES; \
        const __m512 D = _mm512_castps256_ps512(load_scales512(wd + g, ws - g));                                      \
        if (Q4) {                                                                                                     \
          const __m256 M = load_scales512(m + (size_t)n * ws + g, ws - g);                                            \
          const uint8_t* sg = sums + 4 * (size_t)g;                                                                   \
          for (int r = 0; r < R; r++) M_TERM512(M, _mm256_loadu_ps((const float*)(sg + r * stride)), acc[r]);       \
        }                                                                                                             \
        GROUP512(QUADS512, KIND, nb - g);                                                                             \
      }                                                                                                               \
      for (int r = 0; r < R; r++) {                                                                                   \
        __m128 s = halves512(acc[r]);                                                                                 \
        s = _mm_hadd_ps(s, s);                                                                                        \
        s = _mm_hadd_ps(s, s);                                                                                        \
        y[(size_t)r * ldy + n] = _mm_cvtss_f32(s);                                                                    \
      }                                                                                                               \
    }                                                                                                                 \
  }

/* a group of 8 blocks as its quads 0 and 1 through QUAD(KIND, H, BLOCKS); the row's last group may hold fewer (REST) */
#define GROUP512(QUAD, KIND, REST)                                                                                    \
  do {                                                                                                                \
    const int rest_ = (int)(REST);                                                                                    \
    if (rest_ >= 8) {                                                                                                 \
      QUAD(KIND, 0, 4);                                                                                               \
      QUAD(KIND, 1, 4);                                                                                               \
    } else {                                                                                                          \
      QUAD(KIND, 0, rest_ < 4 ? rest_ : 4);                                                                           \
      if (rest_ > 4) QUAD(KIND, 1, rest_ - 4);                                                                        \
    }                                                                                                                 \
  } while (0)

/* the group's quad H (0 or 1) against every row of A */
#define QUADS512(KIND, H, BLOCKS)                                                                                     \
  do {                                                                                                                \
    QUAD_##KIND(wg + (H) * QUAD_BYTES, BLOCKS);                                                                       \
    const __m512 Dq = _mm512_permutexvar_ps(_mm512_load_si512((const void*)QUAD_LANES[H]), D);                        \
    for (int r = 0; r < ROWS; r++)                                                                                    \
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(Dq, _mm512_loadu_ps((const float*)(lg + r * stride + 64 * (H)))),       \
                               DOT512(KIND, ag + r * stride + 128 * (H)), acc[r]);                                    \
  } while (0)

/* one row of A against weight rows n .. n + ROWS - 1 (one_KIND's arithmetic: d * dA once per group of 8 blocks) */
#define DEFINE_ONE512(KIND)                                                                                           \
  AVX512 static inline __attribute__((always_inline)) void one512_##KIND(                                             \
      const uint8_t* qs, const uint16_t* d, const uint16_t* m, int n, int n1, const uint8_t* aq, const Layout* l,     \
      float* y, const int ROWS) {                                                                                     \
    enum { Q4 = IS_##KIND, QUAD_BYTES = Q4 ? 64 : 128 };                                                              \
    const __m512i low4 = _mm512_set1_epi8(0x0F);                                                                      \
    (void)low4;                                                                                                       \
    ONE_ROW_START;                                                                                                    \
    __m512 acc[2];                                                                                                    \
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();                                                      \
    for (size_t g = 0; g < nb; g += 8) {                                                                              \
      const uint8_t* wg[2];                                                                                           \
      __m512 DA[2];                                                                                                   \
      const int8_t* ag = q + 32 * g;                                                                                  \
      for (int r = 0; r < ROWS; r++) {                                                                                \
        wg[r] = wq + r * row_bytes + g / 4 * QUAD_BYTES;                                                              \
        DA[r] = _mm512_castps256_ps512(_mm256_mul_ps(                                                                 \
            load_scales512(wd + r * ws + g, (int)(ws - g)), _mm256_loadu_ps(dA + g)));                                \
        if (Q4)                                                                                                       \
          M_TERM512(load_scales512(wm + r * ws + g, (int)(ws - g)), _mm256_loadu_ps(sA + g),                          \
                    acc[r]);                                                                                          \
      }                                                                                                               \
      GROUP512(ONE_QUAD512, KIND, nb - g);                                                                            \
    }                                                                                                                 \
    __m128 s[2];                                                                                                      \
    for (int r = 0; r < ROWS; r++) s[r] = halves512(acc[r]);                                                          \
    store_sums(s, ROWS, y + n);                                                                                       \
  }                                                                                                                   \
  DEFINE_ONE_ROWS(AVX512, rows512_##KIND##_one, one512_##KIND)

/* quad H (0 or 1) of the group for each of the ROWS weight rows */
#define ONE_QUAD512(KIND, H, BLOCKS)                                                                                  \
  for (int r = 0; r < ROWS; r++) {                                                                                    \
    QUAD_##KIND(wg[r] + (H) * QUAD_BYTES, BLOCKS);                                                                    \
    acc[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_load_si512((const void*)QUAD_LANES[H]), DA[r]),             \
                             DOT512(KIND, ag + 128 * (H)), acc[r]);                                                   \
  }

DEFINE_ONE512(Q4_1)
DEFINE_ONE512(Q8_0)

/* rows512_q4_1 / rows512_q8_0: any count of A rows; 5 or 6 in one pass over the weights, where 4 + 1 and 4 + 2 took
 * two (`bench/kernel_ab.py --rows 5,6`: -15.6 % and -15.8 %, 20 of 20 rounds each); 8 in one pass was slower than two
 * of 4 (+2 %, and +15 % for 128 rows 8 at a time): the accumulators then crowd out what the loop needs. */
#define DEFINE_KIND512(KIND)                                                                                          \
  DEFINE_ROWS512(KIND, 2)                                                                                             \
  DEFINE_ROWS512(KIND, 3)                                                                                             \
  DEFINE_ROWS512(KIND, 4)                                                                                             \
  DEFINE_ROWS512(KIND, 5)                                                                                             \
  DEFINE_ROWS512(KIND, 6)                                                                                             \
  DEFINE_ANY_ROWS(rows512_##KIND##_fours, rows512_##KIND)                                                             \
  static void rows512_##KIND(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int n0, int n1,                \
                             const uint8_t* aq, int count, const Layout* l, float* y, size_t ldy) {                  \
    if (count == 5)                                                                                                   \
      rows512_##KIND##_5(qs, d, m, n0, n1, aq, l, y, ldy);                                                            \
    else if (count == 6)                                                                                              \
      rows512_##KIND##_6(qs, d, m, n0, n1, aq, l, y, ldy);                                                            \
    else                                                                                                              \
      rows512_##KIND##_fours(qs, d, m, n0, n1, aq, count, l, y, ldy);                                                 \
  }
DEFINE_KIND512(Q4_1)
DEFINE_KIND512(Q8_0)

#endif

typedef void (*QuantizeRow)(const float*, const Layout*, uint8_t*);
typedef void (*Rows)(const uint8_t*, const uint16_t*, const uint16_t*, int, int, const uint8_t*, int, const Layout*,
                     float*, size_t);
typedef void (*Swiglu)(const float*, const float*, float*, int);
static QuantizeRow quantize_row = quantize_row_scalar;
static Rows rows = rows_Q4_1_scalar, rows8 = rows_Q8_0_scalar;
static Swiglu swiglu = swiglu_scalar;
static const char* kernels = "scalar";

/* Once per process: AVX2 (with FMA and F16C) where the CPU has it, else the portable C above; and the matrix products
 * in AVX-512 with VNNI where it has that too (A's groups of 4 blocks). SPLITLLM_CPU_KERNELS=scalar or avx2 forces the
 * portable or the AVX2 path (tests compare them on machines that have more). */
static void pick_kernels(void) {
  static int picked;
  if (picked) return;
  picked = 1;
  const char* force = getenv("SPLITLLM_CPU_KERNELS");
  if (force && strcmp(force, "scalar") == 0) return;
#ifdef HAVE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    quantize_row = quantize_row_avx2;
    rows = rows_Q4_1_avx2;
    rows8 = rows_Q8_0_avx2;
    swiglu = swiglu_avx2;
    attention_use_avx2();
    kernels = "avx2";
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni") && !(force && strcmp(force, "avx2") == 0)) {
      a_group = 4;
      rows = rows512_Q4_1;
      rows8 = rows512_Q8_0;
      attention_use_avx512();
      kernels = "avx512";
    }
  }
#endif
}

/* Which kernels this process runs ("avx512", "avx2" or "scalar"), for the stage's log (cpu_kernels.py). */
__attribute__((visibility("default"))) const char* splitllm_kernels(void) {
  pick_kernels();
  return kernels;
}

/* ---------------------------------------------------------------- the ops */

typedef struct {
  const char* name;
  int q8; /* MatMulQ8_0, else MatMulQ4_1 */
  int64_t K, N, swiglu;
} Kernel;

enum { TILE_ROWS = 64, A_TILE = 64 }; /* weight rows per task (~18 KB of Q4_1 at K = 576); rows of A per task */
/* A one-row product (decode) streams its weights from memory: ~ONE_ROW_TILE weight rows a task, in a multiple of 4
 * tasks, so that 2 or 4 threads end together (SmolLM2's N = 576: 4 tasks of 144 rows). The chain's decode step,
 * lockstep A/Bs of 10 rounds against 64-row tasks: 96 rows -5.0 %, 144 a further -4.3 %, 32 +3.8 %. */
enum { ONE_ROW_TILE = 192 };

static int one_row_tile(int width) {
  int tasks = (width + ONE_ROW_TILE - 1) / ONE_ROW_TILE;
  tasks = (tasks + 3) & ~3;
  return ((width + tasks - 1) / tasks + 7) & ~7; /* whole vectors of swiglu: the same bits as in 64-row tiles */
}

typedef struct {
  const float* a;
  const uint8_t* qs;
  const uint16_t *d, *m;
  uint8_t* aq;
  float* y;
  Layout l;
  Rows rows;
  int M, N, tile, n_tiles, swiglu; /* tile: weight rows per task; swiglu: Y has N / 2 columns, the tiles cover them */
} Job;

static void quantize_task(void* p, size_t i) {
  Job* j = (Job*)p;
  int r1 = (int)(i + 1) * A_TILE < j->M ? (int)(i + 1) * A_TILE : j->M;
  for (int r = (int)i * A_TILE; r < r1; r++) quantize_row(j->a + (size_t)r * j->l.K, &j->l, j->aq + r * j->l.stride);
}

/* task i: weight rows tile i % n_tiles against A rows block i / n_tiles */
static void matmul_task(void* p, size_t i) {
  Job* j = (Job*)p;
  const int width = j->swiglu ? j->N / 2 : j->N;
  int t = (int)(i % (size_t)j->n_tiles), blk = (int)(i / (size_t)j->n_tiles);
  int n0 = t * j->tile, n1 = n0 + j->tile < width ? n0 + j->tile : width;
  int r0 = blk * A_TILE, r1 = r0 + A_TILE < j->M ? r0 + A_TILE : j->M;
  const uint8_t* aq = j->aq + (size_t)r0 * j->l.stride;
  if (!j->swiglu) {
    j->rows(j->qs, j->d, j->m, n0, n1, aq, r1 - r0, &j->l, j->y + (size_t)r0 * width, (size_t)width);
    return;
  }
  /* the gate's rows n0..n1 and the up projection's (N/2 further on) into two tiles, then silu(gate) * up */
  float gate[A_TILE * TILE_ROWS], up[A_TILE * TILE_ROWS];
  const size_t row_bytes = (size_t)j->l.nb * 16, half = (size_t)width;
  for (int k = 0; k < 2; k++) {
    const size_t at = n0 + k * half;
    j->rows(j->qs + at * row_bytes, j->d + at * j->l.ws, j->m + at * j->l.ws, 0, n1 - n0, aq, r1 - r0, &j->l,
            k ? up : gate, TILE_ROWS);
  }
  for (int r = 0; r < r1 - r0; r++)
    swiglu(gate + r * TILE_ROWS, up + r * TILE_ROWS, j->y + (size_t)(r0 + r) * width + n0, n1 - n0);
}

static OrtStatus* compute(void* kernel, OrtKernelContext* ctx) {
  const Kernel* k = (const Kernel*)kernel;
  const OrtValue *a, *w[3] = {NULL, NULL, NULL};
  int64_t dims[8], wdims[8];
  size_t rank, wrank;
  char msg[160];
  CHECK(tensor(ctx, 0, &a, dims, &rank));
  if (rank < 1 || dims[rank - 1] != k->K) {
    snprintf(msg, sizeof msg, "%s: A's last dimension is %lld; the weights take K = %lld", k->name,
             rank ? (long long)dims[rank - 1] : 0LL, (long long)k->K);
    return error(ORT_INVALID_ARGUMENT, msg);
  }
  Layout l = layout((int)k->K);
  CHECK(tensor(ctx, 2, &w[1], wdims, &wrank));
  if (wrank == 2 && wdims[1] == l.nb) l.ws = l.nb; /* else padded to nbp, or refused below */
  const int64_t expect[3][2] = {{k->N, k->q8 ? 64 * l.pairs : k->K / 2}, {k->N, l.ws}, {k->N, l.ws}};
  for (int i = 0; i < (k->q8 ? 2 : 3); i++) {
    CHECK(tensor(ctx, 1 + i, &w[i], wdims, &wrank));
    if (wrank != 2 || wdims[0] != expect[i][0] || wdims[1] != expect[i][1]) {
      snprintf(msg, sizeof msg, "%s: weight input %d is not [%lld, %lld] (K = %lld, N = %lld; d%s: [N, K/32] or [N, %d])",
               k->name, i + 1, (long long)expect[i][0], (long long)expect[i][1], (long long)k->K, (long long)k->N,
               k->q8 ? "" : " and m", l.nbp);
      return error(ORT_INVALID_ARGUMENT, msg);
    }
  }
  int64_t M = 1;
  for (size_t i = 0; i + 1 < rank; i++) M *= dims[i];
  dims[rank - 1] = k->swiglu ? k->N / 2 : k->N;
  OrtValue* out;
  CHECK(((KernelContext_GetOutput_t)API(KernelContext_GetOutput))(ctx, 0, dims, rank, &out));
  if (M == 0) return NULL;
  const int tile = M == 1 ? one_row_tile((int)dims[rank - 1]) : TILE_ROWS;
  Job j = {(const float*)data(a), (const uint8_t*)data(w[0]), (const uint16_t*)data(w[1]),
           w[2] ? (const uint16_t*)data(w[2]) : NULL, NULL, (float*)data(out), l, k->q8 ? rows8 : rows, (int)M,
           (int)k->N, tile, (int)((dims[rank - 1] + tile - 1) / tile), (int)k->swiglu};
  uint8_t stack[4096] __attribute__((aligned(64)));
  j.aq = (size_t)M * l.stride <= sizeof stack ? stack : (uint8_t*)malloc((size_t)M * l.stride);
  if (!j.aq) return error(ORT_FAIL, "MatMulQ4_1 / MatMulQ8_0: out of memory for the quantized input");
  KernelContext_ParallelFor_t parallel_for = (KernelContext_ParallelFor_t)API(KernelContext_ParallelFor);
  size_t a_blocks = (size_t)((M + A_TILE - 1) / A_TILE);
  OrtStatus* s = NULL;
  if (M == 1) {
    quantize_task(&j, 0);
  } else {
    s = parallel_for(ctx, quantize_task, a_blocks, 0, &j);
  }
  if (!s) s = parallel_for(ctx, matmul_task, a_blocks * (size_t)j.n_tiles, 0, &j);
  if (j.aq != stack) free(j.aq);
  return s;
}

static const OrtCustomOp matmul_q8_0;

static OrtStatus* create(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** out) {
  (void)api;
  Kernel k = {op->GetName(op), op == &matmul_q8_0, 0, 0, 0};
  KernelInfoGetAttribute_int64_t get = (KernelInfoGetAttribute_int64_t)API(KernelInfoGetAttribute_int64);
  CHECK(get(info, "K", &k.K));
  CHECK(get(info, "N", &k.N));
  OrtStatus* absent = get(info, "swiglu", &k.swiglu); /* optional, default 0 */
  if (absent) {
    ((ReleaseStatus_t)API(ReleaseStatus))(absent);
    k.swiglu = 0;
  }
  if (k.swiglu && (k.q8 || k.N % 2)) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s: swiglu = 1 needs MatMulQ4_1 and an even N (gate and up rows), got N = %lld", k.name,
             (long long)k.N);
    return error(ORT_INVALID_ARGUMENT, msg);
  }
  if (k.K <= 0 || k.K % 32 || k.K > (1 << 24) || k.N <= 0 || k.N > (1 << 24)) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s: K = %lld and N = %lld; K must be a positive multiple of 32, both at most 2^24",
             k.name, (long long)k.K, (long long)k.N);
    return error(ORT_INVALID_ARGUMENT, msg);
  }
  Kernel* p = (Kernel*)malloc(sizeof *p);
  if (!p) return error(ORT_FAIL, "MatMulQ4_1 / MatMulQ8_0: out of memory");
  *p = k;
  *out = p;
  return NULL;
}

static const char* name_q4_1(const struct OrtCustomOp* op) { (void)op; return "MatMulQ4_1"; }
static const char* name_q8_0(const struct OrtCustomOp* op) { (void)op; return "MatMulQ8_0"; }
static const char* provider(const struct OrtCustomOp* op) { (void)op; return "CPUExecutionProvider"; }
static int input_type_q4_1(const struct OrtCustomOp* op, size_t i) {
  (void)op;
  static const int types[4] = {TYPE_FLOAT, TYPE_UINT8, TYPE_FLOAT16, TYPE_FLOAT16};
  return i < 4 ? types[i] : 0;
}
static int input_type_q8_0(const struct OrtCustomOp* op, size_t i) {
  (void)op;
  static const int types[3] = {TYPE_FLOAT, TYPE_INT8, TYPE_FLOAT16};
  return i < 3 ? types[i] : 0;
}
static size_t input_count_q4_1(const struct OrtCustomOp* op) { (void)op; return 4; }
static size_t input_count_q8_0(const struct OrtCustomOp* op) { (void)op; return 3; }
static int output_type(const struct OrtCustomOp* op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t output_count(const struct OrtCustomOp* op) { (void)op; return 1; }
static void destroy(void* kernel) { free(kernel); }
static int required(const struct OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int memory_default(const struct OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int arity_one(const struct OrtCustomOp* op) { (void)op; return 1; }

static const OrtCustomOp matmul_q4_1 = {
    CUSTOM_OP_VERSION, NULL, name_q4_1, provider, input_type_q4_1, input_count_q4_1, output_type, output_count, NULL,
    destroy, required, required, memory_default, arity_one, arity_one, arity_one, arity_one, create, compute,
};
static const OrtCustomOp matmul_q8_0 = {
    CUSTOM_OP_VERSION, NULL, name_q8_0, provider, input_type_q8_0, input_count_q8_0, output_type, output_count, NULL,
    destroy, required, required, memory_default, arity_one, arity_one, arity_one, arity_one, create, compute,
};

__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
  g_api = base->GetApi(ORT_API_VERSION_USED);
  if (!g_api) return NULL; /* cannot even make a status: ONNX Runtime older than the table this needs */
  pick_kernels();
  static OrtCustomOpDomain* domain; /* lives as long as the process: sessions keep pointers into it */
  if (!domain) {
    CHECK(((CreateCustomOpDomain_t)API(CreateCustomOpDomain))("ai.splitllm", &domain));
    CHECK(((CustomOpDomain_Add_t)API(CustomOpDomain_Add))(domain, &matmul_q4_1));
    CHECK(((CustomOpDomain_Add_t)API(CustomOpDomain_Add))(domain, &matmul_q8_0));
    CHECK(((CustomOpDomain_Add_t)API(CustomOpDomain_Add))(domain, &attention_op));
  }
  return ((AddCustomOpDomain_t)API(AddCustomOpDomain))(options, domain);
}
