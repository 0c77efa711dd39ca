/* nmkit lean decode runtime: one whole Llama-family forward pass per call, in plain C.
 *
 * Python (nmkit/runtime/engine.py) packs every weight matrix once into one of the layouts below and
 * calls nmr_forward() once per decode step (or once per prompt chunk): no per-layer Python, one
 * OpenMP parallel region per call with barriers between the steps, a static KV cache.
 *
 * Weight matrices (nmr_mat), y = W x (+ bias), W of shape rows x cols, cols a multiple of 64:
 *   kind F32 / BF16 : kept values row-major, cols*keep/group per row
 *   kind Q8 / Q4    : a row's kept values in units of 64 (a unit spans 64/k64 whole 64-input blocks,
 *                     k64 = 64*keep/group kept per block; the row's last unit is zero-padded). Q8: one
 *                     int8 per value. Q4: 32 bytes per unit, byte j holding value j (low nibble) and
 *                     value j + 32 (high nibble) as q + 8, or as the index of q in the matrix's
 *                     optional 16-level table. One fp16 scale per row and scale group.
 *   kind F32 / BF16, 1:4 and 2:4 ("tiled", index != NULL): tiles of 16 rows (the last one zero-padded),
 *                     so a decode step fills one vector with 16 rows' kept values of one group of 4
 *                     inputs: value (row r, group g, slot s), v = g * keep + s, at r/16 * V * 16 + v * 16 +
 *                     r%16 (V = cols/4 * keep); BF16 interleaves each pair of vectors (v even, v + 1) so
 *                     that vpunpcklwd / vpunpckhwd with zeros widen them: 64 bytes per pair, lane l of
 *                     v at word 8 * (l/4) + 4 * (v%2) + l%4.
 *                     index: the values' positions in their groups, 2 bits each: uint32 word
 *                     ((r/16 * cols/64 + c) * keep + s) * 16 + r%16 holds slot s of groups 16c..16c+15
 *                     of row r, group 16c+j at bits 2j
 *   kind F32 / BF16, any other sparse N:M (M dividing 16; "tiled" too): values tiled as above (V = the
 *                     row's kept count); index: each kept value's column within its 16 inputs, 4 bits,
 *                     in the row's kept order: uint32 word (r/16 * ceil(V/8) + w) * 16 + r%16 holds
 *                     values 8w..8w+7 of row r, value 8w+i at bits 4i (vpermps reads just those bits)
 *   mask            : rows x cols/8 bytes, bit j of byte b <-> column 8b + j (little endian, so 8 bytes
 *                     are the uint64 mask of one 64-input block); NULL when keep == group (dense)
 * "N:M" keeps N (keep) of every M (group) consecutive inputs; group is 2, 4, 8 or 16.
 * Quantized kinds multiply int8 activations, quantized per 64-input block (scale max|x|/127, round to
 * nearest even), with integer dot products (AVX-512 VNNI: vpdpbusd on the kept activations, gathered
 * by the mask with vpcompressb).
 *
 * ISA levels: portable < avx2 (the portable C compiled for AVX2/FMA, vectorised by the compiler) <
 * avx512 (F/BW/VL/DQ + VBMI/VBMI2 + VNNI, hand-written) < avx512bf16 (+ BF16 dot products). Chosen at run
 * time; no -march flag.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NMR_X86 1
#endif

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512BF16 = 3 };
enum { K_F32 = 0, K_BF16 = 1, K_Q8 = 2, K_Q4 = 3 };
enum { Q_MAX_CHUNKS = 64 }; /* quantized rows: at most 64 chunks of 16 blocks (65536 inputs) */
enum { N_MATS = 7 }; /* per layer: q k v o gate up down */

void *PyInit__runtime(void) { return 0; } /* lets setuptools build this as an extension; never imported */

int nmr_version(void) { return 1; }

int nmr_best_isa(void) {
#ifdef NMR_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
        __builtin_cpu_supports("avx512vnni")) {
        return __builtin_cpu_supports("avx512bf16") ? ISA_AVX512BF16 : ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

typedef struct {
    int32_t kind, rows, cols, keep, group, group_blocks; /* group_blocks: 64-input blocks per scale */
    const void *values;
    const uint8_t *mask;
    const uint16_t *scales; /* fp16, rows x n_scales */
    const float *bias;
    const int16_t *wsum;    /* quantized kinds: rows x blocks, the sum of each 64-input block's kept codes */
    const uint8_t *index;   /* 1:4 and 2:4: the kept values' positions in their group of 4, 2 bits each;
                             * quantized kinds: 16 bytes per unit (order: see q_unit_x_index); fp32: the
                             * tiled layout above; else NULL */
    const int8_t *levels;   /* Q4 only, optional: 16 int8 levels, nibble n stands for levels[n] (else n - 8) */
    const uint8_t *tiles;   /* quantized kinds, dense or 4 or 8 kept per 16 inputs, optional: the decode stream
                             * in tiles of 16 rows (see q_tiles; built by nmkit/runtime/pack.py:quant_tiles) */
} nmr_mat;

typedef struct {
    int32_t n_layers, dim, n_heads, n_kv, head_dim, hidden, vocab, max_seq;
    float eps;
    int32_t embed_kind; /* K_F32 or K_BF16 */
    const void *embed;  /* vocab x dim */
    const float *rope_cos, *rope_sin; /* max_seq x head_dim/2 */
    const float *norms;               /* n_layers x 2 x dim (attention, mlp), then the final norm */
    const nmr_mat *mats;              /* n_layers x 7, then the head */
    float *kcache, *vcache;           /* keys n_layers x n_kv x head_dim x max_seq (transposed: scores
                                       * run along positions); values n_layers x n_kv x max_seq x head_dim */
} nmr_model;

/* One token's input vector in the forms the kernels read. */
typedef struct {
    const float *f;    /* fp32 */
    const uint16_t *b; /* bf16 bits */
    const uint8_t *q;  /* int8 + 128, per 64-input block */
    const float *s;    /* block scales */
} xrep;

/* ------------------------------------------------------------------------------ scalar helpers */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept quiet */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) { /* IEEE half, exact */
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, u;
    if (e == 0) {
        if (m == 0) {
            u = s;
        } else { /* subnormal half: normalise */
            int k = -1;
            do { k++; m <<= 1; } while (!(m & 0x400u));
            u = s | ((uint32_t)(127 - 15 - k) << 23) | ((m & 0x3ffu) << 13);
        }
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 127 - 15) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void *alloc64(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? (bytes + 63) / 64 * 64 : 64) ? NULL : p;
}

static inline int64_t kept_per_row(const nmr_mat *W) { return (int64_t)W->cols / W->group * W->keep; }
static inline int n_scales(const nmr_mat *W) { return (W->cols / 64 + W->group_blocks - 1) / W->group_blocks; }
static inline int dense(const nmr_mat *W) { return W->keep == W->group; }
static inline int k64_of(const nmr_mat *W) { return 64 / W->group * W->keep; }
static inline int float_tiled(const nmr_mat *W) { return W->kind <= K_BF16 && W->index != NULL; }
/* Tiled with 2-bit positions in groups of 4 (1:4, 2:4); other tiled patterns carry 4-bit positions. */
static inline int tiled_by_pairs(const nmr_mat *W) { return W->group == 4 && (W->keep == 1 || W->keep == 2); }
/* Where row r's v-th kept value (v = group * keep + slot) sits in a tiled fp32 or bf16 matrix. */
static inline int64_t tiled_at(const nmr_mat *W, int r, int64_t v) {
    const int64_t tile = (int64_t)(r / 16) * kept_per_row(W) * 16;
    const int l = r % 16;
    if (W->kind == K_F32) return tile + v * 16 + l;
    return tile + v / 2 * 32 + 8 * (l / 4) + 4 * (v % 2) + l % 4;
}
static inline int units_per_row(const nmr_mat *W) { /* 64-value units, see the layout above */
    const int per = 64 / k64_of(W);
    return (W->cols / 64 + per - 1) / per;
}

/* -------------------------------------------------------------- portable kernels (reference C) */

static inline __attribute__((always_inline)) float dot_float_row(const nmr_mat *W, int r, const xrep *x) {
    const int64_t kr = kept_per_row(W);
    const uint8_t *mk = W->mask ? W->mask + (int64_t)r * (W->cols / 8) : NULL;
    float acc = 0.f;
    int64_t k = 0;
    if (float_tiled(W)) { /* every group holds exactly keep values, in column order */
        for (int c = 0; c < W->cols; c++) {
            if (!(mk[c >> 3] >> (c & 7) & 1)) continue;
            const int64_t at = tiled_at(W, r, k++);
            acc += W->kind == K_F32 ? ((const float *)W->values)[at] * x->f[c]
                                    : bf16_to_f32(((const uint16_t *)W->values)[at]) * bf16_to_f32(x->b[c]);
        }
    } else if (W->kind == K_F32) {
        const float *v = (const float *)W->values + (int64_t)r * kr;
        if (dense(W)) {
            for (int c = 0; c < W->cols; c++) acc += v[c] * x->f[c];
        } else {
            for (int c = 0; c < W->cols; c++)
                if (mk[c >> 3] >> (c & 7) & 1) acc += v[k++] * x->f[c];
        }
    } else { /* bf16 weights times bf16-rounded activations, summed in fp32 */
        const uint16_t *v = (const uint16_t *)W->values + (int64_t)r * kr;
        if (dense(W)) {
            for (int c = 0; c < W->cols; c++) acc += bf16_to_f32(v[c]) * bf16_to_f32(x->b[c]);
        } else {
            for (int c = 0; c < W->cols; c++)
                if (mk[c >> 3] >> (c & 7) & 1) acc += bf16_to_f32(v[k++]) * bf16_to_f32(x->b[c]);
        }
    }
    return acc;
}

static inline __attribute__((always_inline)) float dot_quant_row(const nmr_mat *W, int r, const xrep *x) {
    const int nb = W->cols / 64, k64 = k64_of(W), ns = n_scales(W);
    const uint8_t *mk = W->mask ? W->mask + (int64_t)r * (W->cols / 8) : NULL;
    const uint16_t *sc = W->scales + (int64_t)r * ns;
    float acc = 0.f;
    for (int b = 0; b < nb; b++) {
        int32_t dot = 0;
        int j = 0;
        for (int c = 0; c < 64; c++) {
            if (mk && !(mk[b * 8 + (c >> 3)] >> (c & 7) & 1)) continue;
            const int64_t g = (int64_t)b * k64 + j; /* the value's place among the row's kept values */
            int w;
            if (W->kind == K_Q8) {
                w = ((const int8_t *)W->values)[(int64_t)r * units_per_row(W) * 64 + g];
            } else {
                const uint8_t byte = ((const uint8_t *)W->values)[(int64_t)r * units_per_row(W) * 32 + g / 64 * 32 + g % 32];
                const int nib = g % 64 < 32 ? (byte & 15) : (byte >> 4);
                w = W->levels ? W->levels[nib] : nib - 8;
            }
            dot += w * ((int)x->q[b * 64 + c] - 128);
            j++;
        }
        acc += (float)dot * (x->s[b] * f16_to_f32(sc[b / W->group_blocks]));
    }
    return acc;
}

#define PORTABLE_ROWS(NAME, ATTR)                                                                   \
    static ATTR void NAME(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {            \
        for (int r = r0; r < r1; r++) {                                                            \
            float v = W->kind >= K_Q8 ? dot_quant_row(W, r, x) : dot_float_row(W, r, x);          \
            y[r] = v + (W->bias ? W->bias[r] : 0.f);                                                \
        }                                                                                          \
    }

PORTABLE_ROWS(rows_portable, )

static void quantize_portable(const float *x, int n, uint8_t *q, float *s) {
    for (int b = 0; b < n / 64; b++) {
        float amax = 0.f;
        for (int c = 0; c < 64; c++) amax = fmaxf(amax, fabsf(x[b * 64 + c]));
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        s[b] = amax / 127.f;
        for (int c = 0; c < 64; c++) {
            float v = nearbyintf(x[b * 64 + c] * id);
            v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
            q[b * 64 + c] = (uint8_t)((int)v + 128);
        }
    }
}

#ifdef NMR_X86
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
PORTABLE_ROWS(rows_avx2, T_AVX2)

/* ------------------------------------------------------------------------- AVX-512 kernels */

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512vnni,f16c,fma,bmi2")))
#define T512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512vnni,avx512bf16,f16c,fma,bmi2")))

static inline __attribute__((always_inline)) T512 __mmask64 low_bytes(int n) {
    return n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
}

/* Quantized rows, one 64-value unit (P = 64/k64 input blocks) per step: gather the unit's kept
 * activations side by side, unpack its weights to int8, one vpdpbusd, then one fused multiply-add
 * with a vector holding each lane's block scale. Blocks go in chunks of 16, whose 16 scale products
 * (activation x weight) are made with one vector multiply. Activations are stored +128, so each
 * block's dot carries 128 x (the sum of its codes): the packed sums (W->wsum) take that off once per
 * 16 blocks rather than with a second dot product per unit. P is a compile-time constant in each
 * instance below, so the gathers unroll. */
/* A unit's 64 weights as int8: INT8 as stored; INT4 nibbles minus 8, or looked up in the matrix's
 * 16-level table (lut: the table in every 128-bit lane; one vpshufb maps 64 nibbles). */
static inline __attribute__((always_inline)) T512 __m512i q_unit_weights(const uint8_t *wp, int q4, const int8_t *levels,
                                                                         __m512i lut) {
    if (!q4) return _mm512_loadu_si512(wp);
    const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    const __m512i t = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)wp));
    const __m512i nib = _mm512_and_si512(_mm512_srlv_epi16(t, shifts), _mm512_set1_epi8(15));
    return levels ? _mm512_shuffle_epi8(lut, nib) : _mm512_sub_epi8(nib, _mm512_set1_epi8(8));
}

static inline __attribute__((always_inline)) T512 __m512i level_lut(const nmr_mat *W) {
    return W->levels ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)W->levels)) : _mm512_setzero_si512();
}

/* The gather by mask: one vpcompressb per block. */
static inline __attribute__((always_inline)) T512 __m512i q_unit_x(const uint8_t *xq, const uint64_t *mk, int b0,
                                                                   int nb, int P) {
    if (P == 1) return mk ? _mm512_maskz_compress_epi8(mk[b0], _mm512_loadu_si512(xq + (int64_t)b0 * 64))
                          : _mm512_loadu_si512(xq + (int64_t)b0 * 64);
    const int k64 = 64 / P;
#define XBLOCK(i) (b0 + (i) < nb ? _mm512_maskz_compress_epi8(mk[b0 + (i)], _mm512_loadu_si512(xq + (int64_t)(b0 + (i)) * 64)) \
                                 : _mm512_setzero_si512())
    if (P == 2) /* two 32-byte halves: an insert is cheaper than another expand */
        return _mm512_inserti64x4(XBLOCK(0), _mm512_castsi512_si256(XBLOCK(1)), 1);
    if (P == 4) {
        const __m512i lo = _mm512_inserti32x4(XBLOCK(0), _mm512_castsi512_si128(XBLOCK(1)), 1);
        const __m512i hi = _mm512_inserti32x4(XBLOCK(2), _mm512_castsi512_si128(XBLOCK(3)), 1);
        return _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1);
    }
    __m512i xu = XBLOCK(0);
    for (int i = 1; i < P; i++) xu = _mm512_mask_expand_epi8(xu, (~(__mmask64)0 >> (64 - k64)) << (i * k64), XBLOCK(i));
#undef XBLOCK
    return xu;
}

/* The gather by position, for M = 4 (P = 2: 2:4, P = 4: 1:4): the unit's 64 two-bit positions become
 * byte indices into its 128-input halves, and vpermt2b picks the activations (vpcompressb is several
 * times slower). Value i's field sits in qword (i/8) % 2 of the unit's 16 bytes at bit
 * 2 * ((i/16) * 8 + i % 8), so one vpmultishiftqb over the broadcast pair lines every field up with
 * its byte; adding the group's first input (base) gives the index. */
static inline __attribute__((always_inline)) T512 __m512i q_unit_x_index(const uint8_t *xq, const uint8_t *ip, int b0,
                                                                         int nb, int P, __m512i fields_at,
                                                                         __m512i base) {
    const __m512i pairs = _mm512_broadcast_i64x2(_mm_loadu_si128((const __m128i *)ip));
    const __m512i idx = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(fields_at, pairs), _mm512_set1_epi8(3),
                                                  base, 0xEA); /* (fields & 3) | base */
#define XB(i) _mm512_maskz_loadu_epi8(b0 + (i) < nb ? ~(__mmask64)0 : 0, xq + (int64_t)(b0 + (i)) * 64)
    const __m512i lo = _mm512_permutex2var_epi8(XB(0), idx, XB(1));
    if (P == 2) return lo;
    return _mm512_mask_blend_epi8(~(__mmask64)0 << 32, lo, _mm512_permutex2var_epi8(XB(2), idx, XB(3)));
#undef XB
}

static inline __attribute__((always_inline)) T512 __m512 q_unit_dot(__m512 acc, __m512i xu, __m512i w, __m512 sv) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xu, w)), sv, acc);
}

/* The 16 weight scales of blocks [b, b+16) of one row, for gb blocks per scale (gb divides 16). */
static inline __attribute__((always_inline)) T512 __m512 q_weight_scales(const uint16_t *sc, int first,
                                                                         __mmask16 valid, int gb, __m512i gb_idx) {
    const __m512 ws = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, sc + first));
    return gb == 1 ? ws : _mm512_permutexvar_ps(gb_idx, ws);
}

/* Sums of four accumulators at once: one short shuffle tree instead of four long reductions
 * (rows here are short, 9-24 blocks, so a per-row reduction was a third of the time). */
static inline __attribute__((always_inline)) T512 void store4(float *y, const float *bias, int r, __m512 a0, __m512 a1,
                                                             __m512 a2, __m512 a3) {
#define HALF(a) _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1))
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(HALF(a0), HALF(a1)), _mm256_hadd_ps(HALF(a2), HALF(a3)));
#undef HALF
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    if (bias) s = _mm_add_ps(s, _mm_loadu_ps(bias + r));
    _mm_storeu_ps(y + r, s);
}

/* Constants of one quantized matrix's row loop (see q_row), so rows do no integer divisions. */
typedef struct {
    __m512i lane_idx, gb_idx, fields_at, base;
    int ns;                            /* scales per row */
    int first[Q_MAX_CHUNKS];           /* chunk c's first scale */
    __mmask16 scale_valid[Q_MAX_CHUNKS], block_valid[Q_MAX_CHUNKS];
} q_consts;

static inline __attribute__((always_inline)) T512 __m512 q_row(const nmr_mat *W, const xrep *x, const float *xs, int r,
                                                               const q_consts *k, int P, int by_index) {
    const int nb = W->cols / 64, U = (nb + P - 1) / P, ns = k->ns, gb = W->group_blocks;
    const int q4 = W->kind == K_Q4, ubytes = q4 ? 32 : 64;
    const uint8_t *wp = (const uint8_t *)W->values + (int64_t)r * U * ubytes;
    const uint8_t *ip = by_index ? W->index + (int64_t)r * U * 16 : NULL;
    const uint64_t *mk = W->mask ? (const uint64_t *)(W->mask + (int64_t)r * (W->cols / 8)) : NULL;
    const uint16_t *sc = W->scales + (int64_t)r * ns;
    const int16_t *ws = W->wsum + (int64_t)r * nb;
    const __m512i lut = level_lut(W);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), sums = _mm512_setzero_ps();
    for (int b = 0, c = 0; b < nb; b += 16, c++) {
        const __m512 sxv = _mm512_mul_ps(_mm512_loadu_ps(xs + b),
                                         q_weight_scales(sc, k->first[c], k->scale_valid[c], gb, k->gb_idx));
        sums = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k->block_valid[c], ws + b))),
                               sxv, sums);
        for (int j = 0; j < 16 / P; j += 2) { /* two units per step, into two accumulators */
            const int b0 = b + j * P;
            if (b0 >= nb) break;
#define UNIT(ACC, B0, J)                                                                                        \
    ACC = q_unit_dot(ACC, by_index ? q_unit_x_index(x->q, ip, B0, nb, P, k->fields_at, k->base)                  \
                                   : q_unit_x(x->q, mk, B0, nb, P),                                            \
                     q_unit_weights(wp, q4, W->levels, lut), _mm512_permutexvar_ps(_mm512_add_epi32(k->lane_idx,                 \
                                                                                    _mm512_set1_epi32((J) * P)), sxv)); \
    wp += ubytes;                                                                                               \
    if (by_index) ip += 16;
            UNIT(acc0, b0, j)
            if (b0 + P >= nb || 16 / P < 2) continue;
            UNIT(acc1, b0 + P, j + 1)
#undef UNIT
        }
    }
    return _mm512_fmadd_ps(sums, _mm512_set1_ps(-128.f), _mm512_add_ps(acc0, acc1));
}

#define Q_ROWS(NAME, P, BY_INDEX)                                                                              \
    static T512 void NAME(const nmr_mat *W, const xrep *x, const float *xs, float *y, int r0, int r1,            \
                          const q_consts *k) {                                                                  \
        int r = r0;                                                                                             \
        for (; r + 4 <= r1; r += 4) {                                                                           \
            __m512 a[4];                                                                                        \
            for (int i = 0; i < 4; i++) a[i] = q_row(W, x, xs, r + i, k, P, BY_INDEX);                          \
            store4(y, W->bias, r, a[0], a[1], a[2], a[3]);                                                      \
        }                                                                                                       \
        for (; r < r1; r++)                                                                                     \
            y[r] = _mm512_reduce_add_ps(q_row(W, x, xs, r, k, P, BY_INDEX)) + (W->bias ? W->bias[r] : 0.f);      \
    }
Q_ROWS(q_rows_p1, 1, 0)
Q_ROWS(q_rows_p2, 2, 0)
Q_ROWS(q_rows_p2_index, 2, 1)
Q_ROWS(q_rows_p4, 4, 0)
Q_ROWS(q_rows_p4_index, 4, 1)
Q_ROWS(q_rows_p8, 8, 0)

/* Quantized dense and sparse (M dividing 16, 4 or 8 kept per 16 inputs) rows from W->tiles, 16 rows at a
 * time: each dword lane is one row, so the int32 dot products of a 64-input block build up in the lanes
 * (no gather across rows, no horizontal sums), and the block's scales, code sums and positions are one
 * vector each for all 16 rows. Per tile and block the stream holds: 16 fp16 weight scales, 16 int16 code
 * sums, for sparse rows the positions, then the codes (vector j: every row's kept values 4j..4j+3 of the
 * block; INT4 keeps two vectors per 64 bytes, the even one in the low nibbles). Activations of a 16-input
 * window are broadcast to each 128-bit lane and vpshufb picks every row's inputs. POS says how its
 * control comes about:
 *   P_PAIRS (1:4, 2:4): 4 x group + a 2-bit position, 16 bytes per code vector;
 *   P_MASK8 (4:8, 1:2: each 8 inputs keep 4, so vector j is inputs 8j..8j+7): the 16 rows' bit masks of
 *            those 8 inputs, 16 bytes; vpcompressb of the inputs' window indices under 8 rows' masks gives
 *            those rows' 4 indices each, in order (4 bits of position per kept value would read as many
 *            bytes as dense INT4);
 *   P_NIBBLES (2:8, 4:16, 8:16): the value's column within its window, 4 bits, 32 bytes per code vector.
 * Dense rows take one broadcast dword of 4 inputs per vector. ZPW: code vectors per window (4 dense, 2 for
 * 2:4 or 4:8, 1 for 1:4 or 2:8), a constant in each instance so the loops unroll. */
enum { P_PAIRS = 0, P_NIBBLES = 1, P_MASK8 = 2 };
static inline __attribute__((always_inline)) T512 void q_tiles(const nmr_mat *W, const xrep *x, float *y, int r0,
                                                               int r1, const int ZPW, const int POS) {
    const int nb = W->cols / 64, q4 = W->kind == K_Q4, sparse = ZPW < 4, nvec = 4 * ZPW;
    const int pos_bytes = POS == P_NIBBLES ? 32 : 16;
    const int block_bytes = 64 + (sparse ? nvec * pos_bytes : 0) + nvec * (q4 ? 32 : 64);
    int8_t tab[64]; /* INT4 nibble n -> its code: levels[n] or n - 8, for any bits above the nibble */
    for (int i = 0; i < 64; i++) tab[i] = (int8_t)(W->levels ? W->levels[i % 16] : i % 16 - 8);
    const __m512i table = _mm512_loadu_si512(tab);
    uint8_t fa[64], b0[64], b1[64];
    for (int i = 0; i < 64; i++) { /* byte i: row i/4, value 4z + i%4 of the window, in group (4z + i%4)/keep */
        fa[i] = (uint8_t)(POS == P_NIBBLES ? 4 * ((i / 32) * 8 + i % 8) : 2 * ((i / 16) * 8 + i % 8));
        b0[i] = (uint8_t)(4 * ((i % 4) / W->keep));
        b1[i] = (uint8_t)(4 * ((4 + i % 4) / W->keep));
    }
    const __m512i fields_at = _mm512_loadu_si512(fa), base0 = _mm512_loadu_si512(b0), base1 = _mm512_loadu_si512(b1);
    uint8_t i0[64], i1[64];
    for (int i = 0; i < 64; i++) i0[i] = (uint8_t)(i % 8), i1[i] = (uint8_t)(8 + i % 8);
    const __m512i in8_0 = _mm512_loadu_si512(i0), in8_1 = _mm512_loadu_si512(i1);
    for (int t = r0 / 16; t * 16 < r1; t++) {
        const uint8_t *p = W->tiles + (int64_t)t * nb * block_bytes;
        __m512 acc = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++, p += block_bytes) {
            const uint8_t *ip = p + 64, *vp = ip + (sparse ? nvec * pos_bytes : 0), *xb = x->q + b * 64;
            __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
            for (int j = 0; j < nvec; j++) {
                __m512i wj;
                if (q4) { /* a pair of code vectors per 64 bytes (the compiler loads each pair once); vpermb
                           * reads 6 index bits, so the table repeats every 16 and no mask is needed */
                    const __m512i pair = _mm512_loadu_si512(vp + j / 2 * 64);
                    wj = _mm512_permutexvar_epi8((j & 1) ? _mm512_srli_epi16(pair, 4) : pair, table);
                } else {
                    wj = _mm512_loadu_si512(vp + j * 64);
                }
                __m512i xj;
                if (sparse) {
                    const __m512i xw = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xb + j / ZPW * 16)));
                    __m512i idx;
                    if (POS == P_MASK8) { /* byte 8r + b: input b of the 8 (+ 8 for an odd vector), row r */
                        uint64_t m[2];
                        memcpy(m, ip + j * 16, 16);
                        const __m512i lo = _mm512_maskz_compress_epi8(_cvtu64_mask64(m[0]), (j & 1) ? in8_1 : in8_0);
                        const __m512i hi = _mm512_maskz_compress_epi8(_cvtu64_mask64(m[1]), (j & 1) ? in8_1 : in8_0);
                        idx = _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1);
                    } else if (POS == P_NIBBLES) { /* 4 qwords of nibbles, byte i's in qword (i/8) % 4 (pack.py:_fields, width 4) */
                        const __m512i fields = _mm512_multishift_epi64_epi8(
                            fields_at, _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(ip + j * 32))));
                        idx = _mm512_and_si512(fields, _mm512_set1_epi8(15));
                    } else {
                        const __m512i fields = _mm512_multishift_epi64_epi8(
                            fields_at, _mm512_broadcast_i64x2(_mm_loadu_si128((const __m128i *)(ip + j * 16))));
                        idx = _mm512_ternarylogic_epi32(fields, _mm512_set1_epi8(3), (j % ZPW) ? base1 : base0, 0xEA);
                    }
                    xj = _mm512_shuffle_epi8(xw, idx);
                } else {
                    xj = _mm512_set1_epi32(*(const int32_t *)(xb + j * 4));
                }
                if (j & 1) d1 = _mm512_dpbusd_epi32(d1, xj, wj);
                else d0 = _mm512_dpbusd_epi32(d0, xj, wj);
            }
            /* activations are stored + 128: take 128 x (the block's code sum) off */
            const __m512i sums = _mm512_slli_epi32(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(p + 32))), 7);
            const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(d0, d1), sums);
            const __m512 sc = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)), _mm512_set1_ps(x->s[b]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc);
        }
        const int n = r1 - t * 16 < 16 ? r1 - t * 16 : 16;
        const __mmask16 live = (__mmask16)((1u << n) - 1);
        if (W->bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(live, W->bias + t * 16));
        _mm512_mask_storeu_ps(y + t * 16, live, acc);
    }
}

static T512 void q_tiles_dense(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {
    q_tiles(W, x, y, r0, r1, 4, P_PAIRS);
}
static T512 void q_tiles_2of4(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) { q_tiles(W, x, y, r0, r1, 2, P_PAIRS); }
static T512 void q_tiles_1of4(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) { q_tiles(W, x, y, r0, r1, 1, P_PAIRS); }
static T512 void q_tiles_4of8(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) { q_tiles(W, x, y, r0, r1, 2, P_MASK8); }
static T512 void q_tiles_8of16(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {
    q_tiles(W, x, y, r0, r1, 2, P_NIBBLES);
}
static T512 void q_tiles_4of16(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {
    q_tiles(W, x, y, r0, r1, 1, P_NIBBLES);
}

static T512 void rows_quant_512(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {
    if (W->tiles) {
        if (dense(W)) q_tiles_dense(W, x, y, r0, r1);
        else if (W->group != 4 && k64_of(W) == 32) (W->group == 16 ? q_tiles_8of16 : q_tiles_4of8)(W, x, y, r0, r1);
        else if (W->group != 4) q_tiles_4of16(W, x, y, r0, r1); /* 2:8, 4:16 */
        else if (W->keep == 2) q_tiles_2of4(W, x, y, r0, r1);
        else q_tiles_1of4(W, x, y, r0, r1);
        return;
    }
    const int nb = W->cols / 64, padded = (nb + 15) / 16 * 16, P = 64 / k64_of(W);
    float xs[padded]; /* the activation scales, zero past the last block */
    for (int b = 0; b < padded; b++) xs[b] = b < nb ? x->s[b] : 0.f;
    int lanes[16], gbl[16];
    uint8_t fields_at[64], base[64];
    for (int l = 0; l < 16; l++) lanes[l] = l / (16 / P), gbl[l] = l / W->group_blocks;
    for (int i = 0; i < 64; i++) {
        fields_at[i] = (uint8_t)(2 * ((i / 16) * 8 + i % 8));
        base[i] = (uint8_t)(P == 2 ? i / 2 * 4 : i % 32 * 4);
    }
    q_consts k = {_mm512_loadu_si512(lanes), _mm512_loadu_si512(gbl), _mm512_loadu_si512(fields_at),
                  _mm512_loadu_si512(base), n_scales(W), {0}, {0}, {0}};
    const int gb = W->group_blocks;
    for (int b = 0, c = 0; b < nb && c < Q_MAX_CHUNKS; b += 16, c++) {
        const int scales = (nb - b + gb - 1) / gb, blocks = nb - b;
        k.first[c] = b / gb;
        k.scale_valid[c] = scales >= 16 ? 0xffff : (__mmask16)((1u << scales) - 1);
        k.block_valid[c] = blocks >= 16 ? 0xffff : (__mmask16)((1u << blocks) - 1);
    }
    const int by_index = W->index != NULL;
    switch (P) {
    case 1: q_rows_p1(W, x, xs, y, r0, r1, &k); break;
    case 2: by_index ? q_rows_p2_index(W, x, xs, y, r0, r1, &k) : q_rows_p2(W, x, xs, y, r0, r1, &k); break;
    case 4: by_index ? q_rows_p4_index(W, x, xs, y, r0, r1, &k) : q_rows_p4(W, x, xs, y, r0, r1, &k); break;
    default: q_rows_p8(W, x, xs, y, r0, r1, &k); break;
    }
}

/* fp32 rows: per 16 inputs, load the p16 kept values, vexpandps them into place, FMA. */
static T512 void rows_f32_512(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {
    const int64_t kr = kept_per_row(W);
    const int p16 = 16 / W->group * W->keep;
    const __mmask16 lowp = (__mmask16)((1u << p16) - 1);
    for (int r = r0; r < r1; r++) {
        const float *v = (const float *)W->values + (int64_t)r * kr;
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        if (dense(W)) {
            int c = 0;
            for (; c + 32 <= W->cols; c += 32) {
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + c), _mm512_loadu_ps(x->f + c), acc0);
                acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(v + c + 16), _mm512_loadu_ps(x->f + c + 16), acc1);
            }
            for (; c < W->cols; c += 16)
                acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(v + c), _mm512_loadu_ps(x->f + c), acc0);
        } else {
            const uint16_t *mk = (const uint16_t *)(W->mask + (int64_t)r * (W->cols / 8));
            for (int c = 0; c < W->cols; c += 32, v += 2 * p16) {
                const __m512 wa = _mm512_maskz_expand_ps(mk[c / 16], _mm512_maskz_loadu_ps(lowp, v));
                const __m512 wb = _mm512_maskz_expand_ps(mk[c / 16 + 1], _mm512_maskz_loadu_ps(lowp, v + p16));
                acc0 = _mm512_fmadd_ps(wa, _mm512_loadu_ps(x->f + c), acc0);
                acc1 = _mm512_fmadd_ps(wb, _mm512_loadu_ps(x->f + c + 16), acc1);
            }
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (W->bias ? W->bias[r] : 0.f);
    }
}

/* Tiled fp32 1:4 and 2:4: one vector is 16 rows' slot-s values of one group of 4 inputs; the group's 4
 * inputs are broadcast to every 128-bit lane and each lane picks its row's input with vpermilps, which
 * reads only the low 2 bits of its control, so a shift moves on to the next group's positions. No
 * gather, no horizontal sum: the accumulators are the tile's 16 outputs. */
static inline __attribute__((always_inline)) T512 __m512 bf16x16_to_ps(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The next two vectors of a tiled matrix as fp32: two loads, or (bf16) one load widened by interleaving
 * zeros below each value. */
#define TILED_PAIR(W0, W1, V, BF)                                                                         \
    if (BF) {                                                                                            \
        const __m512i pair = _mm512_loadu_si512((const uint16_t *)(V));                                  \
        W0 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), pair));                   \
        W1 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), pair));                   \
    } else {                                                                                             \
        W0 = _mm512_loadu_ps((const float *)(V));                                                        \
        W1 = _mm512_loadu_ps((const float *)(V) + 16);                                                   \
    }

static inline __attribute__((always_inline)) T512 void rows_tiled(const nmr_mat *W, const float *xf, float *y, int r0,
                                                                  int r1, const int bf) {
    const int G = W->cols / 4, C = W->cols / 64, keep = W->keep, esize = bf ? 2 : 4;
    for (int t = r0 / 16; t * 16 < r1; t++) {
        const char *v = (const char *)W->values + (int64_t)t * G * keep * 16 * esize;
        const __m512i *ix = (const __m512i *)W->index + (int64_t)t * C * keep;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int c = 0; c < C; c++) {
            const float *xc = xf + c * 64;
            __m512 w0, w1;
            if (keep == 1) {
                __m512i p = _mm512_loadu_si512(ix++);
                for (int j = 0; j < 16; j += 2, v += 32 * esize, p = _mm512_srli_epi32(p, 4)) {
                    const __m512 xa = _mm512_broadcast_f32x4(_mm_loadu_ps(xc + 4 * j));
                    const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(xc + 4 * j + 4));
                    TILED_PAIR(w0, w1, v, bf)
                    a0 = _mm512_fmadd_ps(w0, _mm512_permutevar_ps(xa, p), a0);
                    a1 = _mm512_fmadd_ps(w1, _mm512_permutevar_ps(xb, _mm512_srli_epi32(p, 2)), a1);
                }
            } else {
                __m512i p0 = _mm512_loadu_si512(ix), p1 = _mm512_loadu_si512(ix + 1);
                ix += 2;
                for (int j = 0; j < 16; j++, v += 32 * esize) {
                    const __m512 xa = _mm512_broadcast_f32x4(_mm_loadu_ps(xc + 4 * j));
                    TILED_PAIR(w0, w1, v, bf)
                    a0 = _mm512_fmadd_ps(w0, _mm512_permutevar_ps(xa, p0), a0);
                    a1 = _mm512_fmadd_ps(w1, _mm512_permutevar_ps(xa, p1), a1);
                    p0 = _mm512_srli_epi32(p0, 2);
                    p1 = _mm512_srli_epi32(p1, 2);
                }
            }
        }
        const int n = r1 - t * 16 < 16 ? r1 - t * 16 : 16;
        const __mmask16 live = (__mmask16)((1u << n) - 1);
        __m512 out = _mm512_add_ps(a0, a1);
        if (W->bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(live, W->bias + t * 16));
        _mm512_mask_storeu_ps(y + t * 16, live, out);
    }
}
/* Tiled N:M with M dividing 16 (2:8, 4:8, 8:16, 1:2, ...): per 32 inputs, the two 16-input halves sit
 * in xa and xb; each vector of 16 rows' kept values picks every lane's input with vpermps, whose control
 * is the lane's 4-bit position (only the low 4 bits are read, so a shift moves on to the next value).
 * The first K16 values of the 32 lie in xa, the rest in xb. K32 is a compile-time constant in the
 * common instantiations, so the loop unrolls and the index reloads land at fixed places. */
static inline __attribute__((always_inline)) T512 void rows_tiled_nibbles(const nmr_mat *W, const float *xf, float *y,
                                                                          int r0, int r1, const int bf, const int K32) {
    const int64_t kr = kept_per_row(W), nw = (kr + 7) / 8;
    const int K16 = K32 / 2, esize = bf ? 2 : 4;
    for (int t = r0 / 16; t * 16 < r1; t++) {
        const char *v = (const char *)W->values + (int64_t)t * kr * 16 * esize;
        const __m512i *ix = (const __m512i *)W->index + (int64_t)t * nw;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512i p = _mm512_setzero_si512();
        int left = 0;
        for (int c = 0; c < W->cols; c += 32) {
            const __m512 xa = _mm512_loadu_ps(xf + c), xb = _mm512_loadu_ps(xf + c + 16);
            for (int s = 0; s < K32; s += 2, v += 32 * esize) {
                if (!left) { /* kr and K32 are even, so a pair never straddles two index vectors */
                    p = _mm512_loadu_si512(ix++);
                    left = 8;
                }
                __m512 w0, w1;
                TILED_PAIR(w0, w1, v, bf)
                a0 = _mm512_fmadd_ps(w0, _mm512_permutexvar_ps(p, s < K16 ? xa : xb), a0);
                p = _mm512_srli_epi32(p, 4);
                a1 = _mm512_fmadd_ps(w1, _mm512_permutexvar_ps(p, s + 1 < K16 ? xa : xb), a1);
                p = _mm512_srli_epi32(p, 4);
                left -= 2;
            }
        }
        const int n = r1 - t * 16 < 16 ? r1 - t * 16 : 16;
        const __mmask16 live = (__mmask16)((1u << n) - 1);
        __m512 out = _mm512_add_ps(a0, a1);
        if (W->bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(live, W->bias + t * 16));
        _mm512_mask_storeu_ps(y + t * 16, live, out);
    }
}
#undef TILED_PAIR

/* One instantiation per common kept count per 32 inputs (constant loop bounds), one generic. */
static inline __attribute__((always_inline)) T512 void rows_tiled_any(const nmr_mat *W, const float *xf, float *y,
                                                                      int r0, int r1, const int bf) {
    if (tiled_by_pairs(W)) {
        rows_tiled(W, xf, y, r0, r1, bf);
        return;
    }
    switch (32 / W->group * W->keep) {
    case 4: rows_tiled_nibbles(W, xf, y, r0, r1, bf, 4); break;
    case 8: rows_tiled_nibbles(W, xf, y, r0, r1, bf, 8); break;
    case 16: rows_tiled_nibbles(W, xf, y, r0, r1, bf, 16); break;
    default: rows_tiled_nibbles(W, xf, y, r0, r1, bf, 32 / W->group * W->keep); break;
    }
}

static T512 void rows_f32_tiled_512(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {
    rows_tiled_any(W, x->f, y, r0, r1, 0);
}

/* bf16: the activations rounded to bf16 (as the other bf16 kernels multiply them), widened once per call. */
static T512 void rows_bf16_tiled_512(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {
    float *xf = alloc64(sizeof(float) * W->cols);
    if (!xf) abort(); /* a few KB; the forward pass has no error path for this */
    for (int c = 0; c < W->cols; c += 16)
        _mm512_storeu_ps(xf + c, bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(x->b + c))));
    rows_tiled_any(W, xf, y, r0, r1, 1);
    free(xf);
}

/* bf16 rows without BF16 dot products: widen both operands to fp32 (exact) and FMA. */

static inline __attribute__((always_inline)) T512 __m512i bf16_weights32(const uint16_t *v, const uint32_t *mk, int c,
                                                                        int p32) {
    if (!mk) return _mm512_loadu_si512(v);
    return _mm512_maskz_expand_epi16(mk[c / 32], _mm512_maskz_loadu_epi16((__mmask32)(((uint64_t)1 << p32) - 1), v));
}

static T512 void rows_bf16_512(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {
    const int64_t kr = kept_per_row(W);
    const int p32 = dense(W) ? 32 : 32 / W->group * W->keep;
    for (int r = r0; r < r1; r++) {
        const uint16_t *v = (const uint16_t *)W->values + (int64_t)r * kr;
        const uint32_t *mk = dense(W) ? NULL : (const uint32_t *)(W->mask + (int64_t)r * (W->cols / 8));
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int c = 0; c < W->cols; c += 32, v += p32) {
            const __m512i w = bf16_weights32(v, mk, c, p32), xb = _mm512_loadu_si512(x->b + c);
            acc0 = _mm512_fmadd_ps(bf16x16_to_ps(_mm512_castsi512_si256(w)), bf16x16_to_ps(_mm512_castsi512_si256(xb)), acc0);
            acc1 = _mm512_fmadd_ps(bf16x16_to_ps(_mm512_extracti64x4_epi64(w, 1)),
                                   bf16x16_to_ps(_mm512_extracti64x4_epi64(xb, 1)), acc1);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (W->bias ? W->bias[r] : 0.f);
    }
}

static T512BF void rows_bf16_512bf(const nmr_mat *W, const xrep *x, float *y, int r0, int r1) {
    const int64_t kr = kept_per_row(W);
    const int p32 = dense(W) ? 32 : 32 / W->group * W->keep;
    for (int r = r0; r < r1; r++) {
        const uint16_t *v = (const uint16_t *)W->values + (int64_t)r * kr;
        const uint32_t *mk = dense(W) ? NULL : (const uint32_t *)(W->mask + (int64_t)r * (W->cols / 8));
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int c = 0;
        for (; c + 64 <= W->cols; c += 64, v += 2 * p32) {
            const __m512i wa = bf16_weights32(v, mk, c, p32), wb = bf16_weights32(v + p32, mk, c + 32, p32);
            acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)wa, (__m512bh)_mm512_loadu_si512(x->b + c));
            acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)wb, (__m512bh)_mm512_loadu_si512(x->b + c + 32));
        }
        for (; c < W->cols; c += 32, v += p32)
            acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)bf16_weights32(v, mk, c, p32),
                                    (__m512bh)_mm512_loadu_si512(x->b + c));
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (W->bias ? W->bias[r] : 0.f);
    }
}

static T512 void quantize_512(const float *x, int n, uint8_t *q, float *s) {
    const __m512 lim = _mm512_set1_ps(127.f), nlim = _mm512_set1_ps(-127.f);
    for (int b = 0; b < n / 64; b++) {
        const float *xb = x + b * 64;
        __m512 m = _mm512_abs_ps(_mm512_loadu_ps(xb));
        for (int i = 1; i < 4; i++) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xb + 16 * i)));
        const float amax = _mm512_reduce_max_ps(m);
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        s[b] = amax / 127.f;
        for (int i = 0; i < 4; i++) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xb + 16 * i), _mm512_set1_ps(id));
            v = _mm512_max_ps(_mm512_min_ps(v, lim), nlim);
            const __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(v), _mm512_set1_epi32(128));
            _mm_storeu_si128((__m128i *)(q + b * 64 + 16 * i), _mm512_cvtepi32_epi8(qi));
        }
    }
}
#endif /* NMR_X86 */

/* y[r0:r1] = W x for one token, on the chosen ISA path. */
static void mat_rows(const nmr_mat *W, const xrep *x, float *y, int r0, int r1, int isa) {
#ifdef NMR_X86
    if (isa >= ISA_AVX512) {
        if (W->kind >= K_Q8) rows_quant_512(W, x, y, r0, r1);
        else if (float_tiled(W) && W->kind == K_F32) rows_f32_tiled_512(W, x, y, r0, r1);
        else if (float_tiled(W)) rows_bf16_tiled_512(W, x, y, r0, r1);
        else if (W->kind == K_F32) rows_f32_512(W, x, y, r0, r1);
        else if (isa >= ISA_AVX512BF16) rows_bf16_512bf(W, x, y, r0, r1);
        else rows_bf16_512(W, x, y, r0, r1);
        return;
    }
    if (isa == ISA_AVX2) {
        rows_avx2(W, x, y, r0, r1);
        return;
    }
#endif
    (void)isa;
    rows_portable(W, x, y, r0, r1);
}

static void quantize_x(const float *x, int n, uint8_t *q, float *s, int isa) {
#ifdef NMR_X86
    if (isa >= ISA_AVX512) {
        quantize_512(x, n, q, s);
        return;
    }
#endif
    (void)isa;
    quantize_portable(x, n, q, s);
}

/* ------------------------------------------------------------------------- one matrix, T tokens */

typedef struct {
    float *f;    /* T x ld floats: the input as given */
    uint16_t *b; /* T x ld bf16 */
    uint8_t *q;  /* T x ld int8 + 128 */
    float *s;    /* T x ld/64 scales */
    int ld;
    /* Prefill (T >= PREFILL_MIN on AVX-512): the same values in token tiles of 16, laid out for the
     * panel kernels: pf[tile][c][16] fp32, pb[tile][c/2][16][2] bf16, pq[tile][c/4][16][4] int8 + 128,
     * ps[tile][block][16] scales. Padding tokens are zero and their outputs are never stored. */
    int tiles;
    float *pf;
    uint16_t *pb;
    uint8_t *pq;
    float *ps;
} xbuf;

enum { PREFILL_MIN = 16, PANEL = 8 };

static inline xrep xrep_at(const xbuf *X, int t) {
    xrep r = {X->f + (int64_t)t * X->ld, X->b + (int64_t)t * X->ld, X->q + (int64_t)t * X->ld,
              X->s + (int64_t)t * (X->ld / 64)};
    return r;
}

/* The forms of token t's vector that the matrices in `kinds` (a bit set) read. */
static void prepare(const xbuf *X, int t, int n, unsigned kinds, int isa) {
    const float *x = X->f + (int64_t)t * X->ld;
    uint16_t *b = X->b + (int64_t)t * X->ld;
    uint8_t *q = X->q + (int64_t)t * X->ld;
    float *s = X->s + (int64_t)t * (X->ld / 64);
    if (kinds & (1u << K_BF16))
        for (int i = 0; i < n; i++) b[i] = f32_to_bf16(x[i]);
    if (kinds & ((1u << K_Q8) | (1u << K_Q4))) quantize_x(x, n, q, s, isa);
    if (!X->tiles) return;
    const int tile = t / 16, lane = t % 16;
    const int64_t ld = X->ld;
    if (kinds & (1u << K_F32))
        for (int i = 0; i < n; i++) X->pf[((int64_t)tile * ld + i) * 16 + lane] = x[i];
    if (kinds & (1u << K_BF16))
        for (int i = 0; i < n; i++) X->pb[(((int64_t)tile * ld / 2 + i / 2) * 16 + lane) * 2 + i % 2] = b[i];
    if (kinds & ((1u << K_Q8) | (1u << K_Q4))) {
        for (int i = 0; i < n; i++) X->pq[(((int64_t)tile * ld / 4 + i / 4) * 16 + lane) * 4 + i % 4] = q[i];
        for (int j = 0; j < n / 64; j++) X->ps[((int64_t)tile * (ld / 64) + j) * 16 + lane] = s[j];
    }
}

static void thread_range(int n, int align, int nth, int tid, int *a, int *b) {
    int units = (n + align - 1) / align, per = units / nth, extra = units % nth;
    int u0 = tid * per + (tid < extra ? tid : extra), u1 = u0 + per + (tid < extra ? 1 : 0);
    *a = u0 * align < n ? u0 * align : n;
    *b = u1 * align < n ? u1 * align : n;
}

#ifdef NMR_X86
/* ---------------------------------------------------------------- prefill: dense panels, token tiles
 * A panel of PANEL rows is expanded to dense once (zeros where pruned, integer codes for INT8/INT4),
 * then every tile of 16 tokens passes over it: one broadcast weight (or weight pair / quad) times a
 * vector of 16 tokens per instruction. The expansion costs one pass over the panel and is shared by
 * all T/16 tiles, so a prompt runs at dense-GEMM speed without gathering activations per token. */

/* Row r of W expanded to dense, zeros where pruned, in the form its panel kernel reads: fp32 (wf),
 * bf16 bits (wb) or int8 codes (wq) with each block's code sum and weight scale (wsum, sw). Every
 * 16 inputs hold the same number of kept values (M divides 16), so the kept values are read at fixed
 * strides and put in place with one expand per vector. */
static T512 void expand_row(const nmr_mat *W, int r, float *wf, uint16_t *wb, int8_t *wq, int32_t *wsum, float *sw) {
    const int cols = W->cols, nb = cols / 64;
    const uint8_t *mk = W->mask ? W->mask + (int64_t)r * (cols / 8) : NULL;
    if (float_tiled(W)) { /* the row's kept values sit 16 lanes apart: gather them, then expand as below */
        const int p16 = 16 / W->group * W->keep, l = r % 16;
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const char *tile = (const char *)W->values + (int64_t)(r / 16) * kept_per_row(W) * 16 * (W->kind == K_F32 ? 4 : 2);
        for (int c = 0, k = 0; c < cols; c += 16, k += p16) {
            const __mmask16 live = (__mmask16)((1u << p16) - 1);
            const __m512i v = _mm512_add_epi32(_mm512_set1_epi32(k), lane);
            if (W->kind == K_F32) {
                const __m512i at = _mm512_add_epi32(_mm512_slli_epi32(v, 4), _mm512_set1_epi32(l));
                const __m512 kept = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, at, tile, 4);
                _mm512_storeu_ps(wf + c, _mm512_maskz_expand_ps(((const uint16_t *)mk)[c / 16], kept));
            } else { /* word (v/2)*32 + 4*(v%2) + 8*(l/4) + l%4; read its aligned dword, keep the right half */
                const __m512i word = _mm512_add_epi32(
                    _mm512_add_epi32(_mm512_slli_epi32(_mm512_srli_epi32(v, 1), 5), _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(1)), 2)),
                    _mm512_set1_epi32(8 * (l / 4) + l % 4));
                __m512i d = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, _mm512_srli_epi32(word, 1), tile, 4);
                d = l % 2 ? _mm512_srli_epi32(d, 16) : d;
                const __m256i kept = _mm512_cvtepi32_epi16(d);
                const __m256i dense16 = _mm512_castsi512_si256(_mm512_maskz_expand_epi16(((const uint16_t *)mk)[c / 16],
                                                                                         _mm512_castsi256_si512(kept)));
                _mm256_storeu_si256((__m256i *)(wb + c), dense16);
            }
        }
        return;
    }
    if (W->kind == K_F32) {
        const int p16 = dense(W) ? 16 : 16 / W->group * W->keep;
        const float *v = (const float *)W->values + (int64_t)r * kept_per_row(W);
        for (int c = 0; c < cols; c += 16, v += p16) {
            const __mmask16 m = mk ? ((const uint16_t *)mk)[c / 16] : 0xffff;
            _mm512_storeu_ps(wf + c, _mm512_maskz_expand_ps(m, _mm512_maskz_loadu_ps((__mmask16)((1u << p16) - 1), v)));
        }
        return;
    }
    if (W->kind == K_BF16) {
        const int p32 = dense(W) ? 32 : 32 / W->group * W->keep;
        const uint16_t *v = (const uint16_t *)W->values + (int64_t)r * kept_per_row(W);
        for (int c = 0; c < cols; c += 32, v += p32) {
            const __mmask32 m = mk ? ((const uint32_t *)mk)[c / 32] : 0xffffffffu;
            const __m512i kept = _mm512_maskz_loadu_epi16((__mmask32)(((uint64_t)1 << p32) - 1), v);
            _mm512_storeu_si512(wb + c, _mm512_maskz_expand_epi16(m, kept));
        }
        return;
    }
    const int k64 = k64_of(W), P = 64 / k64, q4 = W->kind == K_Q4, ubytes = q4 ? 32 : 64;
    const uint8_t *wp = (const uint8_t *)W->values + (int64_t)r * units_per_row(W) * ubytes;
    const uint16_t *sc = W->scales + (int64_t)r * n_scales(W);
    const __m512i ones = _mm512_set1_epi8(1), lut = level_lut(W);
    __m512i unit = _mm512_setzero_si512();
    for (int b = 0; b < nb; b++) {
        const int at = (b % P) * k64; /* this block's first kept value within its unit */
        if (at == 0) {
            unit = q_unit_weights(wp, q4, W->levels, lut);
            wp += ubytes;
        }
        const __m512i kept = P == 1 ? unit : _mm512_maskz_compress_epi8((__mmask64)(low_bytes(k64) << at), unit);
        const __m512i w = _mm512_maskz_expand_epi8(mk ? ((const uint64_t *)mk)[b] : ~(__mmask64)0, kept);
        _mm512_storeu_si512(wq + b * 64, w);
        wsum[b] = _mm512_reduce_add_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, w));
        sw[b] = f16_to_f32(sc[b / W->group_blocks]);
    }
}

static T512 void store_panel(float *Y, int ldy, const float *bias, int r0, int nr, int t0, int T, const __m512 *acc) {
    float buf[PANEL][16];
    for (int i = 0; i < nr; i++) _mm512_storeu_ps(buf[i], acc[i]);
    for (int l = 0; l < 16 && t0 + l < T; l++)
        for (int i = 0; i < nr; i++) Y[(int64_t)(t0 + l) * ldy + r0 + i] = buf[i][l] + (bias ? bias[r0 + i] : 0.f);
}

/* Each pass covers two tiles (32 tokens), so every broadcast weight feeds two instructions; the
 * buffers hold one spare zero tile, so an odd last pass reads zeros whose outputs are not stored. */
static T512 void panel_f32(const float *wf, int nr, const xbuf *X, int cols, float *Y, int ldy, const float *bias,
                           int r0, int T) {
    for (int tile = 0; tile < (T + 15) / 16; tile += 2) {
        __m512 a0[PANEL], a1[PANEL];
        for (int i = 0; i < PANEL; i++) a0[i] = a1[i] = _mm512_setzero_ps();
        const float *x0 = X->pf + (int64_t)tile * X->ld * 16, *x1 = x0 + (int64_t)X->ld * 16;
        for (int c = 0; c < cols; c++) {
            const __m512 v0 = _mm512_loadu_ps(x0 + (int64_t)c * 16), v1 = _mm512_loadu_ps(x1 + (int64_t)c * 16);
            for (int i = 0; i < PANEL; i++) {
                const __m512 w = _mm512_set1_ps(wf[i * cols + c]);
                a0[i] = _mm512_fmadd_ps(w, v0, a0[i]);
                a1[i] = _mm512_fmadd_ps(w, v1, a1[i]);
            }
        }
        store_panel(Y, ldy, bias, r0, nr, tile * 16, T, a0);
        store_panel(Y, ldy, bias, r0, nr, tile * 16 + 16, T, a1);
    }
}

static T512BF void panel_bf16(const uint16_t *wb, int nr, const xbuf *X, int cols, float *Y, int ldy, const float *bias,
                              int r0, int T) {
    for (int tile = 0; tile < (T + 15) / 16; tile += 2) {
        __m512 a0[PANEL], a1[PANEL];
        for (int i = 0; i < PANEL; i++) a0[i] = a1[i] = _mm512_setzero_ps();
        const uint16_t *x0 = X->pb + (int64_t)tile * X->ld * 16, *x1 = x0 + (int64_t)X->ld * 16;
        for (int c = 0; c < cols; c += 2) {
            const __m512bh v0 = (__m512bh)_mm512_loadu_si512(x0 + (int64_t)c * 16);
            const __m512bh v1 = (__m512bh)_mm512_loadu_si512(x1 + (int64_t)c * 16);
            for (int i = 0; i < PANEL; i++) {
                uint32_t pair;
                memcpy(&pair, wb + (int64_t)i * cols + c, 4);
                const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pair);
                a0[i] = _mm512_dpbf16_ps(a0[i], v0, w);
                a1[i] = _mm512_dpbf16_ps(a1[i], v1, w);
            }
        }
        store_panel(Y, ldy, bias, r0, nr, tile * 16, T, a0);
        store_panel(Y, ldy, bias, r0, nr, tile * 16 + 16, T, a1);
    }
}

/* Integer panel: per 64-input block, 16 quads of int8 products per row into int32 lanes (one per
 * token), then 128 * sum(w) off (activations are stored +128) and the block's scales applied. */
static T512 void panel_quant(const int8_t *wq, const int32_t *wsum, const float *sw, int nr, const xbuf *X, int cols,
                             float *Y, int ldy, const float *bias, int r0, int T) {
    const int nb = cols / 64;
    for (int tile = 0; tile < (T + 15) / 16; tile += 2) {
        __m512 a0[PANEL], a1[PANEL];
        for (int i = 0; i < PANEL; i++) a0[i] = a1[i] = _mm512_setzero_ps();
        const uint8_t *x0 = X->pq + (int64_t)tile * X->ld * 16, *x1 = x0 + (int64_t)X->ld * 16;
        const float *s0 = X->ps + (int64_t)tile * (X->ld / 64) * 16, *s1 = s0 + (int64_t)(X->ld / 64) * 16;
        for (int b = 0; b < nb; b++) {
            __m512i d0[PANEL], d1[PANEL];
            for (int i = 0; i < PANEL; i++) d0[i] = d1[i] = _mm512_setzero_si512();
            for (int k = 0; k < 64; k += 4) {
                const __m512i v0 = _mm512_loadu_si512(x0 + ((int64_t)b * 64 + k) * 16);
                const __m512i v1 = _mm512_loadu_si512(x1 + ((int64_t)b * 64 + k) * 16);
                for (int i = 0; i < PANEL; i++) {
                    int32_t quad;
                    memcpy(&quad, wq + (int64_t)i * cols + b * 64 + k, 4);
                    const __m512i w = _mm512_set1_epi32(quad);
                    d0[i] = _mm512_dpbusd_epi32(d0[i], v0, w);
                    d1[i] = _mm512_dpbusd_epi32(d1[i], v1, w);
                }
            }
            const __m512 sx0 = _mm512_loadu_ps(s0 + (int64_t)b * 16), sx1 = _mm512_loadu_ps(s1 + (int64_t)b * 16);
            for (int i = 0; i < PANEL; i++) {
                const __m512i off = _mm512_set1_epi32(128 * wsum[i * nb + b]);
                const __m512 ws = _mm512_set1_ps(sw[i * nb + b]);
                a0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d0[i], off)), _mm512_mul_ps(sx0, ws), a0[i]);
                a1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(d1[i], off)), _mm512_mul_ps(sx1, ws), a1[i]);
            }
        }
        store_panel(Y, ldy, bias, r0, nr, tile * 16, T, a0);
        store_panel(Y, ldy, bias, r0, nr, tile * 16 + 16, T, a1);
    }
}

static int prefill_ok(const nmr_mat *W, const xbuf *X, int isa) {
    return X->tiles && isa >= ISA_AVX512 && (W->kind != K_BF16 || isa >= ISA_AVX512BF16);
}

/* This thread's panels of W for all T tokens (the tiles packed by prepare()). */
static void prefill_share(const nmr_mat *W, const xbuf *X, float *Y, int ldy, int T, int nth, int tid) {
    int r0, r1;
    thread_range(W->rows, PANEL, nth, tid, &r0, &r1);
    const int cols = W->cols, nb = cols / 64;
    float *wf = alloc64(sizeof(float) * PANEL * cols);
    uint16_t *wb = alloc64(sizeof(uint16_t) * PANEL * cols);
    int8_t *wq = alloc64((size_t)PANEL * cols);
    int32_t *wsum = alloc64(sizeof(int32_t) * PANEL * nb);
    float *sw = alloc64(sizeof(float) * PANEL * nb);
    for (int p = r0; p < r1; p += PANEL) {
        const int nr = p + PANEL <= r1 ? PANEL : r1 - p;
        for (int i = 0; i < PANEL; i++) {
            if (i >= nr) { /* rows past the end: zero weights, outputs not stored */
                memset(wf + i * cols, 0, sizeof(float) * cols);
                memset(wb + i * cols, 0, sizeof(uint16_t) * cols);
                memset(wq + i * cols, 0, cols);
                for (int b = 0; b < nb; b++) wsum[i * nb + b] = 0, sw[i * nb + b] = 0.f;
                continue;
            }
            expand_row(W, p + i, wf + i * cols, wb + i * cols, wq + i * cols, wsum + i * nb, sw + i * nb);
        }
        if (W->kind == K_F32) panel_f32(wf, nr, X, cols, Y, ldy, W->bias, p, T);
        else if (W->kind == K_BF16) panel_bf16(wb, nr, X, cols, Y, ldy, W->bias, p, T);
        else panel_quant(wq, wsum, sw, nr, X, cols, Y, ldy, W->bias, p, T);
    }
    free(wf); free(wb); free(wq); free(wsum); free(sw);
}
#endif

/* Y[t] = W X[t] for tokens t in [0, T): this thread's share of the rows. Rows are taken in chunks
 * so a chunk's weights stay in cache while every token passes over them (prefill). */
static void matmul_share(const nmr_mat *W, const xbuf *X, float *Y, int ldy, int T, int isa, int nth, int tid) {
#ifdef NMR_X86
    if (T >= PREFILL_MIN && prefill_ok(W, X, isa)) {
        prefill_share(W, X, Y, ldy, T, nth, tid);
        return;
    }
#endif
    int r0, r1;
    thread_range(W->rows, 16, nth, tid, &r0, &r1);
    const int chunk = T == 1 ? W->rows : 16;
    for (int c0 = r0; c0 < r1; c0 += chunk) {
        const int c1 = c0 + chunk < r1 ? c0 + chunk : r1;
        for (int t = 0; t < T; t++) {
            xrep x = xrep_at(X, t);
            mat_rows(W, &x, Y + (int64_t)t * ldy, c0, c1, isa);
        }
    }
}

/* ------------------------------------------------------------------------------ the forward pass */

static void rmsnorm(const float *x, const float *w, float *out, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float inv = 1.f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

static void rope(float *v, const float *cs, const float *sn, int half) {
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
    }
}

/* Causal attention of one query head over cache positions [0, n). Kt: keys transposed (head_dim x ld),
 * so the scores of consecutive positions are one vector FMA per query element. */
static inline __attribute__((always_inline)) void attend_body(const float *q, const float *Kt, int64_t ld,
                                                              const float *V, int n, int hd, float *scores, float *out) {
    const float scale = 1.f / sqrtf((float)hd);
    for (int j = 0; j < n; j++) scores[j] = 0.f;
    for (int i = 0; i < hd; i++) {
        const float qi = q[i] * scale, *k = Kt + i * ld;
#pragma omp simd
        for (int j = 0; j < n; j++) scores[j] += qi * k[j];
    }
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) mx = scores[j] > mx ? scores[j] : mx;
    float sum = 0.f;
    for (int j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - mx);
        sum += scores[j];
    }
    const float inv = 1.f / sum;
    for (int i = 0; i < hd; i++) out[i] = 0.f;
    for (int j = 0; j < n; j++) {
        const float p = scores[j] * inv, *v = V + (int64_t)j * hd;
#pragma omp simd
        for (int i = 0; i < hd; i++) out[i] += p * v[i];
    }
}

static void attend(const float *q, const float *Kt, int64_t ld, const float *V, int n, int hd, float *s, float *o) {
    attend_body(q, Kt, ld, V, n, hd, s, o);
}

#ifdef NMR_X86
/* e^x for x <= 0 (softmax after the max is taken): 2^(x log2 e) as 2^floor * polynomial(fraction). */
static inline __attribute__((always_inline)) T512 __m512 exp_512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f)); /* e^f, f in [0, ln 2) */
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

static T512 void attend_512(const float *q, const float *Kt, int64_t ld, const float *V, int n, int hd, float *s,
                            float *o) {
    if (hd % 16) {
        attend_body(q, Kt, ld, V, n, hd, s, o);
        return;
    }
    const float scale = 1.f / sqrtf((float)hd);
    const int nv = (n + 15) / 16;
    for (int v = 0; v < nv; v++) _mm512_storeu_ps(s + v * 16, _mm512_setzero_ps());
    for (int i = 0; i < hd; i++) { /* positions past n read stale cache entries; they are masked below */
        const __m512 qi = _mm512_set1_ps(q[i] * scale);
        const float *k = Kt + i * ld;
        for (int v = 0; v < nv; v++)
            _mm512_storeu_ps(s + v * 16, _mm512_fmadd_ps(qi, _mm512_loadu_ps(k + v * 16), _mm512_loadu_ps(s + v * 16)));
    }
    const __mmask16 tail = (n % 16) ? (__mmask16)((1u << (n % 16)) - 1) : 0xffff;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int v = 0; v < nv; v++)
        mx = _mm512_mask_max_ps(mx, v == nv - 1 ? tail : 0xffff, mx, _mm512_loadu_ps(s + v * 16));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int v = 0; v < nv; v++) {
        const __m512 e = _mm512_maskz_mov_ps(v == nv - 1 ? tail : 0xffff, exp_512(_mm512_sub_ps(_mm512_loadu_ps(s + v * 16), m)));
        _mm512_storeu_ps(s + v * 16, e);
        sum = _mm512_add_ps(sum, e);
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sum);
    for (int c = 0; c < hd; c += 16) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int j = 0;
        for (; j + 1 < n; j += 2) {
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), _mm512_loadu_ps(V + (int64_t)j * hd + c), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_set1_ps(s[j + 1]), _mm512_loadu_ps(V + (int64_t)(j + 1) * hd + c), acc1);
        }
        if (j < n) acc0 = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), _mm512_loadu_ps(V + (int64_t)j * hd + c), acc0);
        _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_add_ps(acc0, acc1), _mm512_set1_ps(inv)));
    }
}
#endif

static void attend_isa(const float *q, const float *Kt, int64_t ld, const float *V, int n, int hd, float *s, float *o,
                       int isa) {
#ifdef NMR_X86
    if (isa >= ISA_AVX512) {
        attend_512(q, Kt, ld, V, n, hd, s, o);
        return;
    }
#endif
    (void)isa;
    attend(q, Kt, ld, V, n, hd, s, o);
}

static unsigned kind_bit(const nmr_mat *W) { return 1u << W->kind; }

/* What the kernels rely on: whole 64-input blocks, the quantized kinds' scales and code sums, and
 * positions only where the gather by position applies. */
static int mat_ok(const nmr_mat *W) {
    if (W->cols % 64 || (!dense(W) && !W->mask)) return 0;
    if (W->kind >= K_Q8 && (!W->scales || !W->wsum || W->cols > Q_MAX_CHUNKS * 16 * 64)) return 0;
    if (W->levels && W->kind != K_Q4) return 0;
    if (W->tiles && !(W->kind >= K_Q8 && (dense(W) || k64_of(W) == 16 || k64_of(W) == 32))) return 0;
    if (!W->index) return 1;
    if (W->kind <= K_BF16) return !dense(W) && 16 % W->group == 0; /* tiled: 2-bit or 4-bit positions */
    return tiled_by_pairs(W);                                        /* integer gather by position */
}


static int xbuf_alloc(xbuf *X, int T, int ld, int isa) {
    X->ld = ld;
    X->tiles = T >= PREFILL_MIN && isa >= ISA_AVX512 ? (T + 15) / 16 : 0;
    if (X->tiles) {
        const size_t n = (size_t)(X->tiles + 1) * 16 * ld; /* one spare zero tile: panels go two tiles at a time */
        X->pf = alloc64(sizeof(float) * n);
        X->pb = alloc64(sizeof(uint16_t) * n);
        X->pq = alloc64(n);
        X->ps = alloc64(sizeof(float) * (n / 64 + 16));
        if (!X->pf || !X->pb || !X->pq || !X->ps) return 0;
        memset(X->pf, 0, sizeof(float) * n);
        memset(X->pb, 0, sizeof(uint16_t) * n);
        memset(X->pq, 0, n);
        memset(X->ps, 0, sizeof(float) * (n / 64 + 16));
    }
    X->f = alloc64(sizeof(float) * T * ld);
    X->b = alloc64(sizeof(uint16_t) * T * ld);
    X->q = alloc64((size_t)T * ld);
    X->s = alloc64(sizeof(float) * T * (ld / 64 + 1));
    return X->f && X->b && X->q && X->s;
}

static void xbuf_free(xbuf *X) {
    free(X->pf);
    free(X->pb);
    free(X->pq);
    free(X->ps);
    free(X->f);
    free(X->b);
    free(X->q);
    free(X->s);
}

/* Runs tokens[0:T] at positions pos..pos+T-1, appending their keys and values to the cache.
 * logits: vocab floats for the last token, or T x vocab when all_logits. Returns 0, or a negative
 * code: -1 bad arguments, -2 out of memory. */
int nmr_forward(const nmr_model *M, const int32_t *tokens, int T, int pos, float *logits, int all_logits,
                int isa, int nth) {
    if (T < 1 || pos < 0 || pos + T > M->max_seq || M->dim % 64 || M->hidden % 64) return -1;
    for (int i = 0; i < M->n_layers * 7 + 1; i++)
        if (!mat_ok(&M->mats[i])) return -1;
    const int dim = M->dim, hd = M->head_dim, nh = M->n_heads, nkv = M->n_kv, hid = M->hidden;
    const int qdim = nh * hd, kvdim = nkv * hd, wide = hid > qdim ? (hid > dim ? hid : dim) : (qdim > dim ? qdim : dim);
    const int n_out = all_logits ? T : 1, t_out = all_logits ? 0 : T - 1;
    if (nth < 1) nth = 1;

    float *x = alloc64(sizeof(float) * T * dim), *tmp = alloc64(sizeof(float) * T * wide);
    float *qb = alloc64(sizeof(float) * T * qdim), *kb = alloc64(sizeof(float) * T * kvdim);
    float *vb = alloc64(sizeof(float) * T * kvdim), *ub = alloc64(sizeof(float) * T * hid);
    float *scores = alloc64(sizeof(float) * nth * (M->max_seq + 16));
    xbuf X = {0};
    int ok = x && tmp && qb && kb && vb && ub && scores && xbuf_alloc(&X, T, wide, isa);
    if (!ok) {
        free(x); free(tmp); free(qb); free(kb); free(vb); free(ub); free(scores);
        xbuf_free(&X);
        return -2;
    }
    const int ld = X.ld;

#pragma omp parallel num_threads(nth)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int tid = 0, nt = 1;
#endif
        int t0, t1;
        thread_range(T, 1, nt, tid, &t0, &t1);
        for (int t = t0; t < t1; t++) { /* embedding lookup */
            const int64_t row = (int64_t)tokens[t] * dim;
            for (int i = 0; i < dim; i++)
                x[(int64_t)t * dim + i] = M->embed_kind == K_F32 ? ((const float *)M->embed)[row + i]
                                                                  : bf16_to_f32(((const uint16_t *)M->embed)[row + i]);
        }
        for (int l = 0; l < M->n_layers; l++) {
            const nmr_mat *Wl = M->mats + (int64_t)l * N_MATS;
            const float *n_att = M->norms + (int64_t)l * 2 * dim, *n_mlp = n_att + dim;
            float *Kc = M->kcache + (int64_t)l * nkv * M->max_seq * hd, *Vc = M->vcache + (int64_t)l * nkv * M->max_seq * hd;
#pragma omp barrier
            for (int t = t0; t < t1; t++) {
                rmsnorm(x + (int64_t)t * dim, n_att, X.f + (int64_t)t * ld, dim, M->eps);
                prepare(&X, t, dim, kind_bit(&Wl[0]) | kind_bit(&Wl[1]) | kind_bit(&Wl[2]), isa);
            }
#pragma omp barrier
            matmul_share(&Wl[0], &X, qb, qdim, T, isa, nt, tid);
            matmul_share(&Wl[1], &X, kb, kvdim, T, isa, nt, tid);
            matmul_share(&Wl[2], &X, vb, kvdim, T, isa, nt, tid);
#pragma omp barrier
            { /* rotary embedding, then keys and values into the cache: (token, kv head) pairs */
                int a, b;
                thread_range(T * nkv, 1, nt, tid, &a, &b);
                for (int i = a; i < b; i++) {
                    const int t = i / nkv, h = i % nkv, p = pos + t;
                    const float *cs = M->rope_cos + (int64_t)p * (hd / 2), *sn = M->rope_sin + (int64_t)p * (hd / 2);
                    float *k = kb + (int64_t)t * kvdim + h * hd;
                    rope(k, cs, sn, hd / 2);
                    for (int i = 0; i < hd; i++) Kc[((int64_t)h * hd + i) * M->max_seq + p] = k[i];
                    memcpy(Vc + ((int64_t)h * M->max_seq + p) * hd, vb + (int64_t)t * kvdim + h * hd, sizeof(float) * hd);
                    for (int g = 0; g < nh / nkv; g++) {
                        float *q = qb + (int64_t)t * qdim + (h * (nh / nkv) + g) * hd;
                        rope(q, cs, sn, hd / 2);
                    }
                }
            }
#pragma omp barrier
            { /* attention: (token, head) pairs; output into X.f as the o-projection's input */
                int a, b;
                thread_range(T * nh, 1, nt, tid, &a, &b);
                for (int i = a; i < b; i++) {
                    const int t = i / nh, h = i % nh, kvh = h / (nh / nkv);
                    attend_isa(qb + (int64_t)t * qdim + h * hd, Kc + (int64_t)kvh * hd * M->max_seq, M->max_seq,
                               Vc + (int64_t)kvh * M->max_seq * hd, pos + t + 1, hd, scores + (int64_t)tid * (M->max_seq + 16),
                               X.f + (int64_t)t * ld + h * hd, isa);
                }
            }
#pragma omp barrier
            for (int t = t0; t < t1; t++) prepare(&X, t, qdim, kind_bit(&Wl[3]), isa);
#pragma omp barrier
            matmul_share(&Wl[3], &X, tmp, dim, T, isa, nt, tid);
#pragma omp barrier
            for (int t = t0; t < t1; t++) {
                float *xt = x + (int64_t)t * dim;
                for (int i = 0; i < dim; i++) xt[i] += tmp[(int64_t)t * dim + i];
                rmsnorm(xt, n_mlp, X.f + (int64_t)t * ld, dim, M->eps);
                prepare(&X, t, dim, kind_bit(&Wl[4]) | kind_bit(&Wl[5]), isa);
            }
#pragma omp barrier
            matmul_share(&Wl[4], &X, tmp, hid, T, isa, nt, tid);
            matmul_share(&Wl[5], &X, ub, hid, T, isa, nt, tid);
#pragma omp barrier
            for (int t = t0; t < t1; t++) { /* SiLU(gate) * up, the down projection's input */
                float *o = X.f + (int64_t)t * ld;
                const float *g = tmp + (int64_t)t * hid, *u = ub + (int64_t)t * hid;
                for (int i = 0; i < hid; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
                prepare(&X, t, hid, kind_bit(&Wl[6]), isa);
            }
#pragma omp barrier
            matmul_share(&Wl[6], &X, tmp, dim, T, isa, nt, tid);
#pragma omp barrier
            for (int t = t0; t < t1; t++)
                for (int i = 0; i < dim; i++) x[(int64_t)t * dim + i] += tmp[(int64_t)t * dim + i];
        }
        const nmr_mat *head = M->mats + (int64_t)M->n_layers * N_MATS;
        const float *n_final = M->norms + (int64_t)M->n_layers * 2 * dim;
#pragma omp barrier
        {
            int a, b;
            thread_range(n_out, 1, nt, tid, &a, &b);
            for (int i = a; i < b; i++) {
                rmsnorm(x + (int64_t)(t_out + i) * dim, n_final, X.f + (int64_t)i * ld, dim, M->eps);
                prepare(&X, i, dim, kind_bit(head), isa);
            }
        }
#pragma omp barrier
        matmul_share(head, &X, logits, M->vocab, n_out, isa, nt, tid);
    }
    free(x); free(tmp); free(qb); free(kb); free(vb); free(ub); free(scores);
    xbuf_free(&X);
    return 0;
}

/* One matrix on one or more tokens, for the kernel tests: y (T x rows) = x (T x cols) W^T. */
int nmr_matmul(const nmr_mat *W, const float *x, int T, float *y, int isa, int nth) {
    if (T < 1 || !mat_ok(W)) return -1;
    xbuf X = {0};
    if (!xbuf_alloc(&X, T, W->cols, isa)) {
        xbuf_free(&X);
        return -2;
    }
    memcpy(X.f, x, sizeof(float) * T * W->cols);
    for (int t = 0; t < T; t++) prepare(&X, t, W->cols, kind_bit(W), isa);
#pragma omp parallel num_threads(nth < 1 ? 1 : nth)
    {
#ifdef _OPENMP
        matmul_share(W, &X, y, W->rows, T, isa, omp_get_num_threads(), omp_get_thread_num());
#else
        matmul_share(W, &X, y, W->rows, T, isa, 1, 0);
#endif
    }
    xbuf_free(&X);
    return 0;
}

/* The structs' sizes and last fields' offsets, so the ctypes mirrors can be checked against them. */
void nmr_layout(int64_t *out) {
    out[0] = (int64_t)sizeof(nmr_mat);
    out[1] = (int64_t)offsetof(nmr_mat, tiles);
    out[2] = (int64_t)sizeof(nmr_model);
    out[3] = (int64_t)offsetof(nmr_model, vcache);
}

/* The activation quantizer, exposed so the torch reference can be checked against it. */
void nmr_quantize(const float *x, int n, uint8_t *q, float *s, int isa) { quantize_x(x, n, q, s, isa); }
