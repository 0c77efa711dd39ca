/* nmkit CPU kernels: y[B, out] = x[B, in] @ W^T with W stored as N:M compressed values + bitmask.
 *
 * Plain C, no torch ABI; called through ctypes. Layout (see nmkit/formats/nm.py):
 *   values: [rows][kp * p16 / 16] kept weights, row-major, increasing column (fp32 or bf16 bits)
 *   mask:   [rows][kp / 8] bytes, bit j of byte b <-> column 8b + j (so two bytes are the uint16 mask
 *           of a 16-column chunk, four bytes the uint32 mask of a 32-column chunk)
 *   p16:    kept values per 16 columns (16 * N / M; constant because M divides 16 and every group
 *           keeps exactly N), kp a multiple of 32.
 *
 * Kernels: GEMV for small batches (load p16 values, register vexpandps / vpexpandw, FMA or
 * vdpbf16ps) and an SpMM for larger batches that decodes column offsets from the mask with
 * tzcnt/blsr and skips the pruned products (x transposed once into XT[k][Bp], k-blocked so the
 * XT block stays in L1). Each ISA path is compiled with a target attribute and chosen at run time;
 * there is no -march flag, so the library runs on any x86-64 (and the portable path anywhere).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NMK_X86 1
#endif

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512BF16 = 3 };
enum { DT_F32 = 0, DT_BF16 = 1 };
enum { KIND_AUTO = 0, KIND_GEMV = 1, KIND_SPMM = 2, KIND_GATHER = 3, KIND_PAIR = 4 };

/* Dummy module init so setuptools can build this as an extension module; Python never imports it. */
void *PyInit__native(void) { return 0; }

int nmk_version(void) { return 1; }

/* Highest ISA level this CPU supports (the Python side may ask for a lower one). */
int nmk_best_isa(void) {
#ifdef NMK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
        if (__builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bf16"))
            return ISA_AVX512BF16;
        return ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi"))
        return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

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

typedef struct {
    int dtype;            /* DT_F32 or DT_BF16, for values, x and y */
    const void *values;
    const uint8_t *mask;
    int rows, kp, p16;    /* p16 kept per 16 columns */
    const void *x;
    int64_t ldx;          /* elements between tokens in x (>= kp) */
    int batch;
    void *y;
    int64_t ldy;          /* elements between tokens in y (>= rows) */
} nmk_args;

static inline float load_w(const nmk_args *a, int64_t i) {
    return a->dtype == DT_F32 ? ((const float *)a->values)[i] : bf16_to_f32(((const uint16_t *)a->values)[i]);
}

static inline float load_x(const nmk_args *a, int64_t i) {
    return a->dtype == DT_F32 ? ((const float *)a->x)[i] : bf16_to_f32(((const uint16_t *)a->x)[i]);
}

static inline void store_y(const nmk_args *a, int64_t i, float v) {
    if (a->dtype == DT_F32)
        ((float *)a->y)[i] = v;
    else
        ((uint16_t *)a->y)[i] = f32_to_bf16(v);
}

/* Rows [r0, r1) split evenly over threads, in multiples of 4 so register blocks stay whole. */
static inline void thread_rows(int rows, int nth, int tid, int *r0, int *r1) {
    int blocks = (rows + 3) / 4;
    int per = blocks / nth, extra = blocks % nth;
    int b0 = tid * per + (tid < extra ? tid : extra);
    int b1 = b0 + per + (tid < extra ? 1 : 0);
    *r0 = b0 * 4 < rows ? b0 * 4 : rows;
    *r1 = b1 * 4 < rows ? b1 * 4 : rows;
}

/* Kernel layout ("blocked", made by nmkit.formats.blocked): rows padded to a multiple of 4; for each
 * block of 4 rows and each 32-column unit u, the kept values of rows 0..3 for that unit (2*p16 each)
 * are stored one after another, and so are their 32-bit masks. A 4-row register block then reads
 * one value stream and one mask stream, which the hardware prefetchers follow far better than
 * eight separate row streams (measured 1.5-1.9x on cold weights). */
#define UNIT_VALS(a) (2 * (a)->p16)                  /* values per row per 32-column unit */
#define BLOCK_VALS(a) ((int64_t)(a)->kp / 32 * 4 * UNIT_VALS(a)) /* values per 4-row block */

/* ---------------------------------------------------------------- portable (any CPU, any batch) */

static void portable_rows(const nmk_args *a, int r0, int r1) {
    const int nu = a->kp / 32, q = UNIT_VALS(a);
    const uint32_t *M = (const uint32_t *)a->mask;
    for (int r = r0; r < r1 && r < a->rows; r++) {
        const int64_t rb = r / 4, i = r % 4;
        for (int t = 0; t < a->batch; t++) {
            float acc = 0.f;
            for (int u = 0; u < nu; u++) {
                int64_t vi = rb * BLOCK_VALS(a) + ((int64_t)u * 4 + i) * q;
                uint32_t m = M[(rb * nu + u) * 4 + i];
                while (m) {
                    int j = __builtin_ctz(m);
                    m &= m - 1;
                    acc += load_w(a, vi++) * load_x(a, (int64_t)t * a->ldx + 32 * u + j);
                }
            }
            store_y(a, (int64_t)t * a->ldy + r, acc);
        }
    }
}

#ifdef NMK_X86
/* ------------------------------------------------------------------ AVX-512 fp32 bitmask GEMV */
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi,bmi2,popcnt,fma")))

/* Expand into a freshly zeroed register instead of using the {z} form: on the development CPU (AMD
 * family 26) a zero-masked vexpandps/vpexpandw waits for the old value of its destination, and
 * GCC reuses one destination register, which serialised the GEMV (3-4x slower at 1 and 4 tokens).
 * The empty asm keeps the compiler from folding the zero back into a {z} expand. */
static inline __attribute__((always_inline)) T512 __m512 expand_ps(__mmask16 k, __m512 v) {
    __m512 z = _mm512_setzero_ps();
    __asm__("" : "+v"(z));
    return _mm512_mask_expand_ps(z, k, v);
}

/* Load the p kept fp32 values of a 16-column chunk (exact-width loads for common p, else masked). */
#define LD_F32_8(v) _mm512_castps256_ps512(_mm256_loadu_ps(v))
#define LD_F32_4(v) _mm512_castps128_ps512(_mm_loadu_ps(v))
#define LD_F32_0(v) _mm512_maskz_loadu_ps(lm, v)

/* 4 rows (row block at r) x NB tokens register block over units [u0, u1). accm: partial sums
 * (4 x NB vectors) carried between column tiles; first / last: this tile starts them at zero /
 * finishes them into y (a single tile needs no accm). */
#define DEF_GEMV_F32_512(NB, P)                                                                       \
    static T512 void gemv_f32_512_##NB##_##P(const nmk_args *a, int t0, int r, int u0, int u1,        \
                                             float *accm, int first, int last, const char *pv,        \
                                             const char *pm) {                                        \
        const int nu = a->kp / 32, p = a->p16;                                                        \
        const __mmask16 lm = (__mmask16)((1u << p) - 1u);                                             \
        (void)lm;                                                                                     \
        const float *X = (const float *)a->x + (int64_t)t0 * a->ldx;                                  \
        float *Y = (float *)a->y + (int64_t)t0 * a->ldy;                                              \
        __m512 acc[4][NB];                                                                            \
        for (int i = 0; i < 4; i++)                                                                   \
            for (int t = 0; t < NB; t++)                                                              \
                acc[i][t] = first ? _mm512_setzero_ps() : _mm512_load_ps(accm + (i * NB + t) * 16);   \
        const float *v = (const float *)a->values + (int64_t)(r / 4) * BLOCK_VALS(a) + (int64_t)u0 * 8 * p; \
        const uint16_t *m = (const uint16_t *)a->mask + ((int64_t)(r / 4) * nu + u0) * 8;            \
        for (int u = u0; u < u1; u++, v += 8 * p, m += 8) {                                           \
            if (pv) { /* the next tile's weights, spread over this one's units */                     \
                for (int o = 0; o < 32 * p; o += 64) _mm_prefetch(pv + (int64_t)(u - u0) * 32 * p + o, _MM_HINT_T0); \
                if (!(u & 3)) _mm_prefetch(pm + (int64_t)(u - u0) * 16, _MM_HINT_T0);                  \
            }                                                                                         \
            for (int h = 0; h < 2; h++) {                                                             \
                __m512 xv[NB];                                                                        \
                for (int t = 0; t < NB; t++) xv[t] = _mm512_loadu_ps(X + t * a->ldx + u * 32 + h * 16); \
                for (int i = 0; i < 4; i++) {                                                         \
                    __m512 w = expand_ps(m[2 * i + h], LD_F32_##P(v + (2 * i + h) * p));              \
                    for (int t = 0; t < NB; t++) acc[i][t] = _mm512_fmadd_ps(w, xv[t], acc[i][t]);    \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        if (!last) {                                                                                  \
            for (int i = 0; i < 4; i++)                                                               \
                for (int t = 0; t < NB; t++) _mm512_store_ps(accm + (i * NB + t) * 16, acc[i][t]);    \
            return;                                                                                   \
        }                                                                                             \
        for (int i = 0; i < 4 && r + i < a->rows; i++)                                                \
            for (int t = 0; t < NB; t++) Y[t * a->ldy + r + i] = _mm512_reduce_add_ps(acc[i][t]);     \
    }
#define DEF_GEMV_F32_P(P) DEF_GEMV_F32_512(1, P) DEF_GEMV_F32_512(2, P) DEF_GEMV_F32_512(3, P) DEF_GEMV_F32_512(4, P)
DEF_GEMV_F32_P(8)
DEF_GEMV_F32_P(4)
DEF_GEMV_F32_P(0)

#define GEMV_F32_SWITCH(P)                                                              \
    switch (nb) {                                                                       \
        case 1: gemv_f32_512_1_##P(a, t0, r, u0, u1, am, first, last, t0 ? 0 : pv, pm); break; \
        case 2: gemv_f32_512_2_##P(a, t0, r, u0, u1, am, first, last, t0 ? 0 : pv, pm); break; \
        case 3: gemv_f32_512_3_##P(a, t0, r, u0, u1, am, first, last, t0 ? 0 : pv, pm); break; \
        default: gemv_f32_512_4_##P(a, t0, r, u0, u1, am, first, last, t0 ? 0 : pv, pm); break; \
    }

#define GEMV_GROUP 4 /* 4-row blocks per tile */

/* Units per column tile: the x of every token over a tile (batch * units * 128 bytes) within 16 KB of
 * L1, so that it is re-read from L1 by the tile's row blocks. Row block by row block over all columns,
 * x (64 KB for 4 tokens x 4096 columns) came from L2 for every row block: 4096x4096 2:4 at 4 tokens ran
 * 2.75x the time of 1 token on the same weight bytes. */
static int gemv_units(int kp, int batch) {
    if (batch == 1) return kp / 32; /* one token: x stays in L1 anyway; one stream, no tiling */
    int u = 16384 / (batch * 128);
    if (u < 4) u = 4;
    return u < kp / 32 ? u : kp / 32;
}

static size_t gemv_scratch(int batch) { return (size_t)GEMV_GROUP * ((batch + 3) / 4) * 16; } /* vectors */

/* Rows [rb0, rb1) (multiples of 4), every token: tiles of GEMV_GROUP row blocks x gemv_units() units,
 * 4-token groups inner, so a row block's weights are re-read from L1 beyond 4 tokens and x from L1
 * across the tile's row blocks. accs: partial sums between tiles (unused with a single tile). */
static T512 void gemv_f32_512(const nmk_args *a, int rb0, int rb1, float *accs) {
    const int nu = a->kp / 32, cu = gemv_units(a->kp, a->batch), ntg = (a->batch + 3) / 4;
    for (int g0 = rb0; g0 < rb1; g0 += 4 * GEMV_GROUP) {
        const int g1 = g0 + 4 * GEMV_GROUP < rb1 ? g0 + 4 * GEMV_GROUP : rb1;
        for (int u0 = 0; u0 < nu; u0 += cu) {
            const int u1 = u0 + cu < nu ? u0 + cu : nu;
            const int first = u0 == 0, last = u1 == nu;
            for (int r = g0; r < g1; r += 4) {
                /* Prefetch the weights this row block reads next (the next tile, or the next group's
                 * first) during its first token group, spread over the units. At 1 token only below
                 * half density: there it raised 1:4 from ~2.1-3.2x to ~3.3-4.8x of torch (4096x11008,
                 * 11008x4096 cold), while 2:4 did better with the hardware prefetchers alone
                 * (4096x11008: 1.77x without, 1.5-1.7x with). */
                const char *pv = 0, *pm = 0;
                {
                    const int64_t nr = last ? r + 4 * GEMV_GROUP : r;
                    const int nu0 = last ? 0 : u1;
                    if ((a->batch > 1 || a->p16 < 8) && nr < rb1) {
                        pv = (const char *)((const float *)a->values + nr / 4 * BLOCK_VALS(a) + (int64_t)nu0 * 8 * a->p16);
                        pm = (const char *)((const uint16_t *)a->mask + (nr / 4 * nu + nu0) * 8);
                    }
                }
                for (int t0 = 0; t0 < a->batch; t0 += 4) {
                    const int nb = a->batch - t0 < 4 ? a->batch - t0 : 4;
                    float *am = accs + ((int64_t)(r - g0) / 4 * ntg + t0 / 4) * 256;
                    if (a->p16 == 8) {
                        GEMV_F32_SWITCH(8)
                    } else if (a->p16 == 4) {
                        GEMV_F32_SWITCH(4)
                    } else {
                        GEMV_F32_SWITCH(0)
                    }
                }
            }
        }
    }
}

/* ------------------------------------------------- AVX-512 BF16 bitmask GEMV (vpexpandw + vdpbf16ps) */
#define T512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,bmi,bmi2,popcnt,fma")))

static T512BF inline __m512 dp_bf16(__m512 acc, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}

static inline __attribute__((always_inline)) T512BF __m512i expand_epi16(__mmask32 k, __m512i v) {
    __m512i z = _mm512_setzero_si512();
    __asm__("" : "+v"(z));
    return _mm512_mask_expand_epi16(z, k, v);
}

#define LD_H_16(v) _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(v)))
#define LD_H_8(v) _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(v)))
#define LD_H_0(v) _mm512_maskz_loadu_epi16(lm, v)

#define DEF_GEMV_BF16_512(NB, P)                                                                       \
    static T512BF void gemv_bf16_512_##NB##_##P(const nmk_args *a, int t0, int r0, int r1) {           \
        const int nu = a->kp / 32, q = 2 * a->p16;                                                     \
        const __mmask32 lm = (__mmask32)(q == 32 ? 0xffffffffu : ((1u << q) - 1u));                     \
        (void)lm;                                                                                      \
        const uint16_t *X = (const uint16_t *)a->x + (int64_t)t0 * a->ldx;                             \
        for (int r = r0; r < r1; r += 4) {                                                             \
            __m512 acc[4][NB];                                                                         \
            for (int i = 0; i < 4; i++)                                                                \
                for (int t = 0; t < NB; t++) acc[i][t] = _mm512_setzero_ps();                          \
            const uint16_t *v = (const uint16_t *)a->values + (int64_t)(r / 4) * BLOCK_VALS(a);        \
            const uint32_t *m = (const uint32_t *)a->mask + (int64_t)(r / 4) * nu * 4;                 \
            for (int u = 0; u < nu; u++, v += 4 * q, m += 4) {                                         \
                __m512i xv[NB];                                                                        \
                for (int t = 0; t < NB; t++) xv[t] = _mm512_loadu_si512(X + t * a->ldx + u * 32);      \
                for (int i = 0; i < 4; i++) {                                                          \
                    __m512i w = expand_epi16(m[i], LD_H_##P(v + i * q));                                 \
                    for (int t = 0; t < NB; t++) acc[i][t] = dp_bf16(acc[i][t], w, xv[t]);             \
                }                                                                                      \
            }                                                                                          \
            for (int i = 0; i < 4 && r + i < a->rows; i++)                                             \
                for (int t = 0; t < NB; t++)                                                           \
                    store_y(a, (int64_t)(t0 + t) * a->ldy + r + i, _mm512_reduce_add_ps(acc[i][t]));   \
        }                                                                                              \
    }
#define DEF_GEMV_BF16_P(P) DEF_GEMV_BF16_512(1, P) DEF_GEMV_BF16_512(2, P) DEF_GEMV_BF16_512(3, P) DEF_GEMV_BF16_512(4, P)
DEF_GEMV_BF16_P(16)
DEF_GEMV_BF16_P(8)
DEF_GEMV_BF16_P(0)

#define GEMV_SWITCH(PREFIX, P)                                                    \
    switch (nb) {                                                                 \
        case 1: PREFIX##_1_##P(a, t0, r0, r1); break;                             \
        case 2: PREFIX##_2_##P(a, t0, r0, r1); break;                             \
        case 3: PREFIX##_3_##P(a, t0, r0, r1); break;                             \
        default: PREFIX##_4_##P(a, t0, r0, r1); break;                            \
    }

/* Row blocks outer, token groups inner: beyond 4 tokens the block's weights are re-read from L1/L2,
 * not from memory (all rows per token group streamed the weights once per 4 tokens). */
static T512BF void gemv_bf16_512(const nmk_args *a, int rb0, int rb1) {
    for (int r0 = rb0; r0 < rb1; r0 += 4) {
        const int r1 = r0 + 4 < rb1 ? r0 + 4 : rb1;
        for (int t0 = 0; t0 < a->batch; t0 += 4) {
            int nb = a->batch - t0 < 4 ? a->batch - t0 : 4;
            if (a->p16 == 8) {
                GEMV_SWITCH(gemv_bf16_512, 16)
            } else if (a->p16 == 4) {
                GEMV_SWITCH(gemv_bf16_512, 8)
            } else {
                GEMV_SWITCH(gemv_bf16_512, 0)
            }
        }
    }
}

/* ------------------------------------ AVX-512 BF16 gather kernel (half density: 2:4, 4:8, 8:16)
 * For one row and 64 columns the 32 kept bf16 weights fill one vector. Instead of expanding them to
 * 64 lanes (two vpexpandw and two vdpbf16ps per token, half of the products with zeros), the x
 * values they multiply are gathered from the token's 64 columns with one vpermt2w, whose indices
 * (the kept columns, vpcompressb of an iota by the 64-bit mask, widened to words) are made once per
 * row and 64 columns and reused by every token: one permute and one vdpbf16ps per token, row and
 * 64 columns. On the development CPU vpexpandw costs ~1.6 cycles and a vpermt2w + vdpbf16ps pair
 * ~1-1.3 cycles (L1-resident microbenchmark). Register tiles of 4 rows x up to 4 tokens. */
static inline __attribute__((always_inline)) T512BF __m512i kept_idx(uint64_t m) {
    const __m512i iota = _mm512_set_epi8(63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48,
                                         47, 46, 45, 44, 43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32,
                                         31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                         15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i z = _mm512_setzero_si512();
    __asm__("" : "+v"(z)); /* merge into a fresh zero: see expand_ps */
    return _mm512_cvtepu8_epi16(_mm512_castsi512_si256(_mm512_mask_compress_epi8(z, m, iota)));
}

/* Indices and weights of row i of the 4-row block at (vb, mb), for units u and u + 1 (u + 1 < nu) or
 * the last unit alone (upper half of the weights zero). */
static inline __attribute__((always_inline)) T512BF void gather_decode(const uint16_t *vb, const uint32_t *mb,
                                                                      int u, int nu, int i, __m512i *id, __m512i *w) {
    if (u + 1 < nu) {
        *id = kept_idx((uint64_t)mb[u * 4 + i] | (uint64_t)mb[(u + 1) * 4 + i] << 32);
        *w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(vb + (u * 4 + i) * 16))),
                                _mm256_loadu_si256((const __m256i *)(vb + ((u + 1) * 4 + i) * 16)), 1);
    } else {
        *id = kept_idx(mb[u * 4 + i]);
        *w = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(vb + (u * 4 + i) * 16)));
    }
}

/* Row block at r, tokens [t0, t0 + NB), units [u0, u1) (u0 even). pre: the decoded (index, weight)
 * pairs of those units (gather_decode). accm: the partial sums (4 x NB vectors) carried between
 * passes over the units; first / last: this pass starts them at zero / finishes them into y. */
#define DEF_GATHER_BF16(NB)                                                                              \
    static T512BF void gather_bf16_##NB(const nmk_args *a, int t0, int r, const __m512i *pre, int u0,   \
                                        int u1, float *accm, int first, int last, const char *pv,        \
                                        const char *pm) {                                                \
        const int nu = a->kp / 32;                                                                       \
        const uint16_t *X = (const uint16_t *)a->x + (int64_t)t0 * a->ldx;                               \
        __m512 acc[4][NB];                                                                               \
        for (int i = 0; i < 4; i++)                                                                      \
            for (int t = 0; t < NB; t++)                                                                 \
                acc[i][t] = first ? _mm512_setzero_ps() : _mm512_load_ps(accm + (i * NB + t) * 16);      \
        for (int u = u0; u < u1; u += 2, pre += 8) {                                                     \
            if (pv) { /* spread over the steps: a burst of prefetches overflowed the miss queue */      \
                for (int o = 0; o < 256; o += 64) _mm_prefetch(pv + (int64_t)(u - u0) * 128 + o, _MM_HINT_T0); \
                if (!(u & 2)) _mm_prefetch(pm + (int64_t)(u - u0) * 16, _MM_HINT_T0);                   \
            }                                                                                            \
            __m512i id[4], w[4];                                                                         \
            for (int i = 0; i < 4; i++) {                                                                \
                id[i] = _mm512_load_si512(pre + 2 * i);                                                  \
                w[i] = _mm512_load_si512(pre + 2 * i + 1);                                               \
            }                                                                                            \
            if (u + 1 < nu) {                                                                            \
                for (int t = 0; t < NB; t++) {                                                           \
                    const __m512i xl = _mm512_loadu_si512(X + t * a->ldx + u * 32);                     \
                    const __m512i xh = _mm512_loadu_si512(X + t * a->ldx + u * 32 + 32);                 \
                    for (int i = 0; i < 4; i++)                                                          \
                        acc[i][t] = dp_bf16(acc[i][t], w[i], _mm512_permutex2var_epi16(xl, id[i], xh));  \
                }                                                                                        \
            } else { /* last unit alone: 16 kept; the upper 16 products are masked off */                \
                for (int t = 0; t < NB; t++) {                                                           \
                    const __m512i xl = _mm512_loadu_si512(X + t * a->ldx + u * 32);                      \
                    for (int i = 0; i < 4; i++)                                                          \
                        acc[i][t] = _mm512_mask_dpbf16_ps(acc[i][t], 0x00ff, (__m512bh)w[i],             \
                                                          (__m512bh)_mm512_permutexvar_epi16(id[i], xl)); \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        if (!last) {                                                                                     \
            for (int i = 0; i < 4; i++)                                                                  \
                for (int t = 0; t < NB; t++) _mm512_store_ps(accm + (i * NB + t) * 16, acc[i][t]);     \
            return;                                                                                      \
        }                                                                                                \
        for (int i = 0; i < 4 && r + i < a->rows; i++)                                                   \
            for (int t = 0; t < NB; t++)                                                                 \
                store_y(a, (int64_t)(t0 + t) * a->ldy + r + i, _mm512_reduce_add_ps(acc[i][t]));         \
    }
DEF_GATHER_BF16(1)
DEF_GATHER_BF16(2)
DEF_GATHER_BF16(3)
DEF_GATHER_BF16(4)

#define GATHER_GROUP 4  /* 4-row blocks per tile */
#define GATHER_UNITS 32 /* 32-column units per tile: 8 KB of decoded pairs per row block */

/* Scratch per thread for gather_bf16_512, in vectors (64-byte aligned): decoded pairs of one row
 * block's tile + the partial sums of a tile's row blocks x tokens. */
static size_t gather_scratch(int batch) {
    return (size_t)GATHER_UNITS / 2 * 8 + (size_t)GATHER_GROUP * ((batch + 3) / 4) * 16;
}

/* Rows [r0, r1) (multiples of 4), every token, in tiles of GATHER_GROUP row blocks x GATHER_UNITS
 * units: each row block's (index, weight) pairs are decoded once into scratch (L1) and run against
 * every group of 4 tokens, whose x over the tile stays in L1 across the tile's row blocks; partial
 * sums wait in scratch between tiles. While a row block computes, the weights it decodes next are
 * prefetched. Measured on 4096x4096 2:4, 16 tokens, hot: 2.1 ms; without the prefetch 2.9 ms (the
 * decode stalled on memory, 0.6 ms alone, and did not overlap the 1.5 ms of compute); row block by
 * row block over all columns, decoding in registers, 3.4 ms, and 1.5 ms instead of 1.1 ms cold at
 * 4 tokens. */
static T512BF void gather_bf16_512(const nmk_args *a, int r0, int r1, __m512i *scratch) {
    const int nu = a->kp / 32, B = a->batch;
    const int cu = GATHER_UNITS, ntg = (B + 3) / 4;
    float *accm = (float *)(scratch + cu / 2 * 8);
    for (int g0 = r0; g0 < r1; g0 += 4 * GATHER_GROUP) {
        const int g1 = g0 + 4 * GATHER_GROUP < r1 ? g0 + 4 * GATHER_GROUP : r1;
        for (int u0 = 0; u0 < nu; u0 += cu) {
            const int u1 = u0 + cu < nu ? u0 + cu : nu;
            const int first = u0 == 0, last = u1 == nu;
            for (int r = g0; r < g1; r += 4) {
                const uint16_t *vb = (const uint16_t *)a->values + (int64_t)(r / 4) * BLOCK_VALS(a);
                const uint32_t *mb = (const uint32_t *)a->mask + (int64_t)(r / 4) * nu * 4;
                __m512i *s = scratch;
                for (int u = u0; u < u1; u += 2)
                    for (int i = 0; i < 4; i++, s += 2) gather_decode(vb, mb, u, nu, i, s, s + 1);
                /* Prefetch what this row block decodes next (the next tile, or the next group's first)
                 * during its first token group, so the loads overlap the compute. */
                const char *pv = 0, *pm = 0;
                {
                    const int64_t nr = last ? r + 4 * GATHER_GROUP : r;
                    const int nu0 = last ? 0 : u1;
                    if (nr < r1) {
                        pv = (const char *)((const uint16_t *)a->values + nr / 4 * BLOCK_VALS(a) + (int64_t)nu0 * 64);
                        pm = (const char *)((const uint32_t *)a->mask + nr / 4 * nu * 4 + (int64_t)nu0 * 4);
                    }
                }
                float *ar = accm + (int64_t)(r - g0) / 4 * ntg * 256;
                for (int t0 = 0; t0 < B; t0 += 4) {
                    float *am = ar + (int64_t)t0 / 4 * 256;
                    switch (B - t0 < 4 ? B - t0 : 4) {
                        case 1: gather_bf16_1(a, t0, r, scratch, u0, u1, am, first, last, t0 ? 0 : pv, pm); break;
                        case 2: gather_bf16_2(a, t0, r, scratch, u0, u1, am, first, last, t0 ? 0 : pv, pm); break;
                        case 3: gather_bf16_3(a, t0, r, scratch, u0, u1, am, first, last, t0 ? 0 : pv, pm); break;
                        default: gather_bf16_4(a, t0, r, scratch, u0, u1, am, first, last, t0 ? 0 : pv, pm); break;
                    }
                }
            }
        }
    }
}

/* ------------------------------ AVX-512 BF16 pair-table SpMM (2:4 only, from ~16 tokens; KIND_PAIR)
 * A kept 2:4 pair of row o in group g multiplies x at two of the group's 4 columns, (pa, pb), one of
 * the 6 pairs its mask nibble allows. A per-call table holds, for every group g, pair c and 16 tokens,
 * the vector of bf16 pairs (x[t][4g + pa(c)], x[t][4g + pb(c)]) (tokens in the 32-bit lanes), so one
 * vdpbf16ps of that table vector with the broadcast weight pair adds the group's two products for 16
 * tokens: no permute and no products with pruned zeros, one 64-byte table load (a memory operand)
 * per dot product and one 32-bit broadcast per row and group, shared by the token vectors. The gather
 * kernel needs a vpermt2w per dot product and tops out at ~1.6 cycles per pair (BENCHMARKS.md).
 * Tokens go in chunks of up to PAIR_MAXV vectors (64); the table of a chunk is 6 * 4 * kp bytes per
 * vector (1.5 MB for 4096 columns x 64 tokens: L2/L3), read into L1 a column tile at a time and
 * reused by the row blocks of a row group, whose partial sums wait in a small scratch between
 * tiles. */
#define PAIR_MAXV 4

/* Table slot of a 2:4 nibble n: (n >> 1) - 1, which maps the six nibbles with two bits set (3, 5, 6,
 * 9, 10, 12) onto 0..5 with a shift and a mask instead of a lookup (a LUT load per row and group cost
 * ~1 cycle of 4 in the inner loop). pair_pos: the kept positions (pa < pb) of each slot. */
static const uint8_t pair_pos[6][2] = {{0, 1}, {0, 2}, {1, 2}, {0, 3}, {1, 3}, {2, 3}};

/* Table vectors of units [ub0, ub1) for the chunk's tokens [t0, t0 + bc) in nv vectors (tokens past
 * bc are zero): tab[((u * 8 + j) * 6 + c) * nv + v] for group 8u + j. Each unit's 8 groups of 16
 * tokens are first transposed into buf (one 64-bit word = a token's 4 columns of a group), then one
 * vpermt2w per pair picks the two columns of each token. */
static T512BF void pair_table(const nmk_args *a, __m512i *tab, int nv, int t0, int bc, int ub0, int ub1) {
    uint64_t buf[8][16] __attribute__((aligned(64)));
    __m512i idx[6];
    for (int c = 0; c < 6; c++) {
        uint16_t w[32];
        for (int l = 0; l < 16; l++) {
            w[2 * l] = (uint16_t)(4 * l + pair_pos[c][0]);
            w[2 * l + 1] = (uint16_t)(4 * l + pair_pos[c][1]);
        }
        idx[c] = _mm512_loadu_si512(w);
    }
    const uint16_t *X = (const uint16_t *)a->x;
    for (int u = ub0; u < ub1; u++) {
        for (int v = 0; v < nv; v++) {
            for (int l = 0; l < 16; l++) {
                const int t = 16 * v + l;
                uint64_t row[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                if (t < bc) memcpy(row, X + (int64_t)(t0 + t) * a->ldx + 32 * u, 64);
                for (int j = 0; j < 8; j++) buf[j][l] = row[j];
            }
            for (int j = 0; j < 8; j++) {
                const __m512i lo = _mm512_load_si512(buf[j]), hi = _mm512_load_si512(buf[j] + 8);
                __m512i *o = tab + (int64_t)(u * 8 + j) * 6 * nv + v;
                for (int c = 0; c < 6; c++) _mm512_store_si512(o + c * nv, _mm512_permutex2var_epi16(lo, idx[c], hi));
            }
        }
    }
}

/* Row block at r, units [u0, u1), NV token vectors: acc[row][v] += w(row, g) . tab[g][c(row, g)][v].
 * S accumulator sets (alternating groups) keep >= 12 vdpbf16ps chains in
 * flight at 1-2 vectors (latency ~6 cycles, 2 per cycle). accm: partial sums (4 rows x NV vectors),
 * loaded unless first, always stored. pv / pm: weights to prefetch (what this row block reads next). */
#define DEF_PAIR_BF16(NV, S)                                                                              \
    static T512BF void pair_bf16_##NV(const nmk_args *a, const __m512i *tab, int r, int u0, int u1,       \
                                      float *accm, int first, const char *pv, const char *pm) {           \
        const int nu = a->kp / 32;                                                                        \
        __m512 acc[S][4][NV];                                                                             \
        for (int s = 0; s < S; s++)                                                                       \
            for (int i = 0; i < 4; i++)                                                                   \
                for (int v = 0; v < NV; v++)                                                              \
                    acc[s][i][v] = s || first ? _mm512_setzero_ps() : _mm512_load_ps(accm + (i * NV + v) * 16); \
        const uint32_t *vb = (const uint32_t *)((const uint16_t *)a->values + (int64_t)(r / 4) * BLOCK_VALS(a)); \
        const uint32_t *mb = (const uint32_t *)a->mask + (int64_t)(r / 4) * nu * 4;                       \
        const __m512i *tp = tab + (int64_t)u0 * 48 * NV - NV; /* slot + 1 = n >> 1 */                     \
        for (int u = u0; u < u1; u++, tp += 48 * NV) {                                                    \
            if (pv) {                                                                                     \
                _mm_prefetch(pv + (int64_t)(u - u0) * 128, _MM_HINT_T0);                                  \
                _mm_prefetch(pv + (int64_t)(u - u0) * 128 + 64, _MM_HINT_T0);                             \
                if (!((u - u0) & 3)) _mm_prefetch(pm + (int64_t)(u - u0) * 16, _MM_HINT_T0);              \
            }                                                                                             \
            const uint32_t *vu = vb + u * 32;                                                             \
            const uint32_t m[4] = {mb[u * 4], mb[u * 4 + 1], mb[u * 4 + 2], mb[u * 4 + 3]};               \
            _Pragma("GCC unroll 8") /* whole, so that acc[j % S] stays in registers */                    \
            for (int j = 0; j < 8; j++) {                                                                 \
                for (int i = 0; i < 4; i++) {                                                             \
                    const __m512i *t = tp + j * 6 * NV + ((m[i] >> (4 * j + 1)) & 7) * NV;                \
                    const __m512i w = _mm512_set1_epi32((int)vu[i * 8 + j]);                              \
                    for (int v = 0; v < NV; v++)                                                          \
                        acc[j % S][i][v] = dp_bf16(acc[j % S][i][v], w, _mm512_load_si512(t + v));        \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        for (int s = 1; s < S; s++)                                                                       \
            for (int i = 0; i < 4; i++)                                                                   \
                for (int v = 0; v < NV; v++) acc[0][i][v] = _mm512_add_ps(acc[0][i][v], acc[s][i][v]);   \
        for (int i = 0; i < 4; i++)                                                                       \
            for (int v = 0; v < NV; v++) _mm512_store_ps(accm + (i * NV + v) * 16, acc[0][i][v]);        \
    }
DEF_PAIR_BF16(1, 4)
DEF_PAIR_BF16(2, 2)
DEF_PAIR_BF16(3, 1)
DEF_PAIR_BF16(4, 1)

/* Tiling, measured on 4096x4096 and 4096x11008 (1 thread, hot, 16 and 64 tokens): 256-row groups and
 * 36 KB table tiles (3 units at 64 tokens, 12 at 16) beat 64 rows / 24 KB by 5-20 % (64 tokens:
 * 3.8 vs 4.6 ms); 16-row groups re-read the table tiles too often (7.0 ms), 1024 rows were no better. */
#define PAIR_ROWS 256
#define PAIR_TILE_KB 36

static int pair_units(int nv) {
    int u = (PAIR_TILE_KB << 10) / (48 * 64 * nv);
    return u < 1 ? 1 : u;
}

/* Rows [r0, r1) (r0 a multiple of 4) of one token chunk, in row groups of PAIR_ROWS x column tiles of
 * pair_units(nv) units: each row block of the group runs the tile (its table slice stays in L1 across
 * the group), partial sums in accs (PAIR_ROWS x nv vectors). */
static T512BF void pair_bf16_512(const nmk_args *a, const __m512i *tab, int nv, int t0, int bc, int r0, int r1,
                                 float *accs) {
    const int nu = a->kp / 32, ut = pair_units(nv), rg = PAIR_ROWS;
    for (int g0 = r0; g0 < r1; g0 += rg) {
        const int g1 = g0 + rg < r1 ? g0 + rg : r1;
        for (int u0 = 0; u0 < nu; u0 += ut) {
            const int u1 = u0 + ut < nu ? u0 + ut : nu;
            const int first = u0 == 0, last = u1 == nu;
            for (int r = g0; r < g1; r += 4) {
                /* Prefetch what this row block runs next: its next tile, or (after the last) the first
                 * tile of the same block in the next row group. */
                const char *pv = 0, *pm = 0;
                const int64_t nr = last ? r + rg : r;
                const int nu0 = last ? 0 : u1;
                if (nr < r1) {
                    pv = (const char *)((const uint16_t *)a->values + nr / 4 * BLOCK_VALS(a) + (int64_t)nu0 * 64);
                    pm = (const char *)((const uint32_t *)a->mask + (nr / 4 * nu + nu0) * 4);
                }
                float *am = accs + (int64_t)(r - g0) * nv * 16;
                switch (nv) {
                    case 1: pair_bf16_1(a, tab, r, u0, u1, am, first, pv, pm); break;
                    case 2: pair_bf16_2(a, tab, r, u0, u1, am, first, pv, pm); break;
                    case 3: pair_bf16_3(a, tab, r, u0, u1, am, first, pv, pm); break;
                    default: pair_bf16_4(a, tab, r, u0, u1, am, first, pv, pm); break;
                }
            }
        }
        /* y 16 rows at a time per token (see spmm_store_y) */
        const int ge = g1 < a->rows ? g1 : a->rows;
        for (int rb = g0; rb < ge; rb += 16) {
            const int re = rb + 16 < ge ? rb + 16 : ge;
            for (int t = 0; t < bc; t++) {
                uint16_t *y = (uint16_t *)a->y + (int64_t)(t0 + t) * a->ldy;
                for (int q = rb; q < re; q++) y[q] = f32_to_bf16(accs[(int64_t)(q - g0) * nv * 16 + t]);
            }
        }
    }
}

/* ------------------------------------------------------------- SpMM (AVX-512 and AVX2 variants)
 * XT[k][Bp] (fp32, Bp = tokens of this chunk rounded up to the vector width VW, NV = Bp / VW vectors).
 * For a k-block and a 4-row block, every kept weight w at column k does acc[row][v] += w * XT[k][v].
 * Column offsets come from the mask bits (tzcnt + blsr); exactly 2*p16 bits per 32-column unit, so
 * the inner loop has a fixed trip count. Partial sums live in YT[rows][Bp] between k-blocks.
 */
#define SPMM_PF 16 /* units */
#define DEF_SPMM(NAME, TGT, VEC, VW, SET1, LOADU, STOREU, FMADD, ZERO, NV, WT, WCONV, S, ADD)       \
    static TGT void NAME##_##NV(const nmk_args *a, const float *XT, int Bp, int kb0, int kb1, float *YT, \
                                int first, int last, int t0, int bc, int r0, int r1) {                  \
        const int nu = a->kp / 32, q = UNIT_VALS(a);                                                   \
        for (int r = r0; r < r1; r += 4) {                                                             \
            /* S = 2: a second accumulator set for odd j, so few-vector blocks are not FMA-latency bound */ \
            VEC acc[4][NV], acc2[4][NV];                                                               \
            for (int i = 0; i < 4; i++)                                                                \
                for (int v = 0; v < NV; v++) {                                                         \
                    acc[i][v] = first ? ZERO() : LOADU(YT + (int64_t)(r + i) * Bp + v * VW);           \
                    acc2[i][v] = ZERO();                                                               \
                }                                                                                      \
            const WT *vb = (const WT *)a->values + (int64_t)(r / 4) * BLOCK_VALS(a);                   \
            const uint32_t *mb = (const uint32_t *)a->mask + (int64_t)(r / 4) * nu * 4;                \
            for (int u = kb0 / 32; u < kb1 / 32; u++) {                                                \
                const float *xb = XT + (int64_t)(u * 32 - kb0) * Bp;                                   \
                const WT *vu = vb + (int64_t)u * 4 * q;                                                \
                /* prefetch SPMM_PF units ahead (into the next row block at the end): 5.9 -> 3.3 ms for \
                 * 4096x4096 2:4 at 16 tokens, cold; the hardware prefetchers alone fell behind */      \
                for (int o = 0; o < 4 * q * (int)sizeof(WT); o += 64)                                  \
                    _mm_prefetch((const char *)(vu + SPMM_PF * 4 * q) + o, _MM_HINT_T0);                \
                if ((u & 3) == 0) _mm_prefetch((const char *)(mb + (u + SPMM_PF) * 4), _MM_HINT_T0);    \
                uint32_t m[4] = {mb[u * 4], mb[u * 4 + 1], mb[u * 4 + 2], mb[u * 4 + 3]};              \
                for (int j = 0; j < q; j += 2) { /* q = 32 N / M is even */                            \
                    for (int i = 0; i < 4; i++) {                                                      \
                        int k = __builtin_ctz(m[i]);                                                   \
                        m[i] &= m[i] - 1;                                                              \
                        VEC w = SET1(WCONV(vu[i * q + j]));                                            \
                        const float *xr = xb + (int64_t)k * (NV * VW);                                 \
                        for (int v = 0; v < NV; v++) acc[i][v] = FMADD(w, LOADU(xr + v * VW), acc[i][v]); \
                    }                                                                                  \
                    for (int i = 0; i < 4; i++) {                                                      \
                        int k = __builtin_ctz(m[i]);                                                   \
                        m[i] &= m[i] - 1;                                                              \
                        VEC w = SET1(WCONV(vu[i * q + j + 1]));                                        \
                        const float *xr = xb + (int64_t)k * (NV * VW);                                 \
                        for (int v = 0; v < NV; v++) {                                                 \
                            if (S == 2)                                                                \
                                acc2[i][v] = FMADD(w, LOADU(xr + v * VW), acc2[i][v]);                 \
                            else                                                                       \
                                acc[i][v] = FMADD(w, LOADU(xr + v * VW), acc[i][v]);                   \
                        }                                                                              \
                    }                                                                                  \
                }                                                                                      \
            }                                                                                          \
            if (S == 2)                                                                                \
                for (int i = 0; i < 4; i++)                                                            \
                    for (int v = 0; v < NV; v++) acc[i][v] = ADD(acc[i][v], acc2[i][v]);               \
            /* partial or final sums to YT; spmm_store_y writes y from it (in 16-row pieces) */      \
            for (int i = 0; i < 4; i++)                                                                \
                for (int v = 0; v < NV; v++) STOREU(YT + (int64_t)(r + i) * Bp + v * VW, acc[i][v]);   \
        }                                                                                              \
        (void)last; (void)t0; (void)bc;                                                                \
    }

#define F32ID(v) (v)
#define Z512() _mm512_setzero_ps()
DEF_SPMM(spmm512f, T512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, Z512, 1, float, F32ID, 2, _mm512_add_ps)
DEF_SPMM(spmm512h, T512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, Z512, 1, uint16_t, bf16_to_f32, 2, _mm512_add_ps)
DEF_SPMM(spmm512f, T512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, Z512, 2, float, F32ID, 2, _mm512_add_ps)
DEF_SPMM(spmm512h, T512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, Z512, 2, uint16_t, bf16_to_f32, 2, _mm512_add_ps)
DEF_SPMM(spmm512f, T512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, Z512, 3, float, F32ID, 1, _mm512_add_ps)
DEF_SPMM(spmm512h, T512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, Z512, 3, uint16_t, bf16_to_f32, 1, _mm512_add_ps)
DEF_SPMM(spmm512f, T512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, Z512, 4, float, F32ID, 1, _mm512_add_ps)
DEF_SPMM(spmm512h, T512, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, Z512, 4, uint16_t, bf16_to_f32, 1, _mm512_add_ps)

#define T256 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define Z256() _mm256_setzero_ps()
DEF_SPMM(spmm256f, T256, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, Z256, 1, float, F32ID, 2, _mm256_add_ps)
DEF_SPMM(spmm256h, T256, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, Z256, 1, uint16_t, bf16_to_f32, 2, _mm256_add_ps)
DEF_SPMM(spmm256f, T256, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, Z256, 2, float, F32ID, 2, _mm256_add_ps)
DEF_SPMM(spmm256h, T256, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, Z256, 2, uint16_t, bf16_to_f32, 2, _mm256_add_ps)
DEF_SPMM(spmm256f, T256, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, Z256, 4, float, F32ID, 1, _mm256_add_ps)
DEF_SPMM(spmm256h, T256, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, Z256, 4, uint16_t, bf16_to_f32, 1, _mm256_add_ps)
DEF_SPMM(spmm256f, T256, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, Z256, 8, float, F32ID, 1, _mm256_add_ps)
DEF_SPMM(spmm256h, T256, __m256, 8, _mm256_set1_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, Z256, 8, uint16_t, bf16_to_f32, 1, _mm256_add_ps)
#endif /* NMK_X86 */

/* ------------------------------------------------------------------ decompress to dense rows
 * out[r][0..kp) = the dense weight (zeros at pruned positions), for the dense fallback of large
 * batches: one pass over the compressed bytes, far cheaper than a scatter in torch. */
static void decompress_portable(const nmk_args *a, void *out, int64_t ldo, int r0, int r1) {
    const int nu = a->kp / 32, q = UNIT_VALS(a);
    const uint32_t *M = (const uint32_t *)a->mask;
    for (int r = r0; r < r1 && r < a->rows; r++) {
        const int64_t rb = r / 4, i = r % 4;
        for (int u = 0; u < nu; u++) {
            int64_t vi = rb * BLOCK_VALS(a) + ((int64_t)u * 4 + i) * q;
            uint32_t m = M[(rb * nu + u) * 4 + i];
            for (int j = 0; j < 32; j++) {
                int64_t o = (int64_t)r * ldo + 32 * u + j;
                int keep = (m >> j) & 1u;
                if (a->dtype == DT_F32)
                    ((float *)out)[o] = keep ? ((const float *)a->values)[vi] : 0.f;
                else
                    ((uint16_t *)out)[o] = keep ? ((const uint16_t *)a->values)[vi] : 0;
                vi += keep;
            }
        }
    }
}

#ifdef NMK_X86
static T512BF void decompress_512(const nmk_args *a, void *out, int64_t ldo, int r0, int r1) {
    const int nu = a->kp / 32, q = UNIT_VALS(a);
    const uint32_t *M = (const uint32_t *)a->mask;
    for (int r = r0; r < r1 && r < a->rows; r++) {
        const int64_t rb = r / 4, i = r % 4;
        for (int u = 0; u < nu; u++) {
            const int64_t vi = rb * BLOCK_VALS(a) + ((int64_t)u * 4 + i) * q;
            const uint32_t m = M[(rb * nu + u) * 4 + i];
            if (a->dtype == DT_F32) {
                const float *v = (const float *)a->values + vi;
                float *o = (float *)out + (int64_t)r * ldo + 32 * u;
                const int p0 = __builtin_popcount(m & 0xffffu);
                _mm512_storeu_ps(o, expand_ps((__mmask16)m,
                                 _mm512_maskz_loadu_ps((__mmask16)((1u << p0) - 1u), v)));
                const int p1 = q - p0;
                _mm512_storeu_ps(o + 16, expand_ps((__mmask16)(m >> 16),
                                 _mm512_maskz_loadu_ps((__mmask16)((1u << p1) - 1u), v + p0)));
            } else {
                const uint16_t *v = (const uint16_t *)a->values + vi;
                uint16_t *o = (uint16_t *)out + (int64_t)r * ldo + 32 * u;
                const __mmask32 lm = (__mmask32)(q == 32 ? 0xffffffffu : ((1u << q) - 1u));
                _mm512_storeu_si512(o, expand_epi16(m, _mm512_maskz_loadu_epi16(lm, v)));
            }
        }
    }
}
#endif

/* Dense copy of the weight into out (rows x kp, leading dimension ldo >= kp). */
int nmk_decompress(int isa, int dtype, const void *values, const uint8_t *mask, int rows, int kp, int p16,
                   void *out, int64_t ldo, int nthreads) {
    if (isa > nmk_best_isa()) return -1;
    if (rows <= 0 || kp <= 0 || kp % 32 || p16 < 1 || p16 > 16 || ldo < kp) return -2;
    if (dtype != DT_F32 && dtype != DT_BF16) return -2;
    nmk_args a = {dtype, values, mask, rows, kp, p16, 0, 0, 0, 0, 0};
    int nth = nthreads < 1 ? 1 : nthreads;
    int64_t work = (int64_t)rows * kp;
    if (nth > 1 && work / nth < (1 << 20)) nth = (int)(work >> 20) > 1 ? (int)(work >> 20) : 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int r0 = 0, r1 = rows;
#ifdef _OPENMP
        thread_rows(rows, omp_get_num_threads(), omp_get_thread_num(), &r0, &r1);
#endif
#ifdef NMK_X86
        if (isa >= ISA_AVX512BF16)
            decompress_512(&a, out, ldo, r0, r1);
        else
#endif
            decompress_portable(&a, out, ldo, r0, r1);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------- driver */

static int spmm_vw(int isa) { return isa >= ISA_AVX512 ? 16 : 8; }

/* Vectors per token chunk: any 1..4 for AVX-512; 1, 2, 4 or 8 for AVX2 (the instantiated blocks). */
static int spmm_nv(int isa, int bc) {
    int vw = spmm_vw(isa), nv = (bc + vw - 1) / vw;
    if (isa < ISA_AVX512) nv = nv <= 1 ? 1 : nv <= 2 ? 2 : nv <= 4 ? 4 : 8;
    return nv;
}

/* k-block of the SpMM: every column while the chunk's XT (kp * Bp * 4 bytes) fits in L2 with room for
 * the weight stream, else ~512 KB of XT per block, with the rows taken in groups of SPMM_ROW_GROUP so
 * that each group's 4-row blocks are still read front to back. The first version used an L1-sized
 * k-block over all rows: it read every 4-row block in 2-4 KB pieces a whole block apart, which the
 * prefetchers do not follow (4096x4096 2:4, 16 tokens: 8.5 ms vs 5.6 ms row by row, XT from L2). */
static int spmm_kb(int kp, int Bp) {
    if ((int64_t)kp * Bp * 4 <= (640 << 10)) return kp;
    int kb = (512 << 10) / (Bp * 4) / 32 * 32;
    return kb < 32 ? 32 : kb;
}
#define SPMM_ROW_GROUP 32

/* y[t0 + t][r] = YT[r][t] for rows [r0, r1), 16 rows (one 64-byte piece of a y row) per token at a
 * time. Writing each row's tokens directly (one scattered store per row and token) thrashed L1 when
 * y's row stride is a multiple of 2 KB (1536 outputs: all 64 tokens in 2 sets): 1536x576 2:4 at 64
 * tokens ran 1.8x the time of 576x1536 with the same products. */
static void spmm_store_y(const nmk_args *a, const float *YT, int Bp, int t0, int bc, int r0, int r1) {
    if (r1 > a->rows) r1 = a->rows;
    for (int rb = r0; rb < r1; rb += 16) {
        const int re = rb + 16 < r1 ? rb + 16 : r1;
        for (int t = 0; t < bc; t++) {
            const int64_t o = (int64_t)(t0 + t) * a->ldy;
            if (a->dtype == DT_F32) {
                float *y = (float *)a->y + o;
                for (int r = rb; r < re; r++) y[r] = YT[(int64_t)r * Bp + t];
            } else {
                uint16_t *y = (uint16_t *)a->y + o;
                for (int r = rb; r < re; r++) y[r] = f32_to_bf16(YT[(int64_t)r * Bp + t]);
            }
        }
    }
}

/* One SpMM pass over a chunk of up to 64 tokens [t0, t0 + bc); called by every thread. */
static void spmm_chunk(const nmk_args *a, int isa, float *XT, float *YT, int t0, int bc, int nth, int tid) {
#ifdef NMK_X86
    const int nv = spmm_nv(isa, bc), Bp = nv * spmm_vw(isa);
    /* Build XT[k][Bp] for this chunk: columns split over threads. */
    {
        int k0 = (int)((int64_t)a->kp * tid / nth), k1 = (int)((int64_t)a->kp * (tid + 1) / nth);
        for (int k = k0; k < k1; k++) {
            float *row = XT + (int64_t)k * Bp;
            int t = 0;
            for (; t < bc; t++) row[t] = load_x(a, (int64_t)(t0 + t) * a->ldx + k);
            for (; t < Bp; t++) row[t] = 0.f;
        }
    }
#ifdef _OPENMP
    if (nth > 1) {
#pragma omp barrier
    }
#endif
    int r0, r1;
    thread_rows(a->rows, nth, tid, &r0, &r1);
    const int kb = spmm_kb(a->kp, Bp), group = kb < a->kp ? SPMM_ROW_GROUP : r1 - r0 + 4;
    const int h = a->dtype == DT_BF16;
    for (int g0 = r0; g0 < r1; g0 += group) {
        const int g1 = g0 + group < r1 ? g0 + group : r1;
        for (int k0 = 0; k0 < a->kp; k0 += kb) {
            const int k1 = k0 + kb < a->kp ? k0 + kb : a->kp;
            const int first = k0 == 0, last = k1 == a->kp;
            const float *xt = XT + (int64_t)k0 * Bp;
#define SPMM_ARGS a, xt, Bp, k0, k1, YT, first, last, t0, bc, g0, g1
            if (isa >= ISA_AVX512) {
                switch (nv) {
                    case 1: h ? spmm512h_1(SPMM_ARGS) : spmm512f_1(SPMM_ARGS); break;
                    case 2: h ? spmm512h_2(SPMM_ARGS) : spmm512f_2(SPMM_ARGS); break;
                    case 3: h ? spmm512h_3(SPMM_ARGS) : spmm512f_3(SPMM_ARGS); break;
                    default: h ? spmm512h_4(SPMM_ARGS) : spmm512f_4(SPMM_ARGS); break;
                }
            } else {
                switch (nv) {
                    case 1: h ? spmm256h_1(SPMM_ARGS) : spmm256f_1(SPMM_ARGS); break;
                    case 2: h ? spmm256h_2(SPMM_ARGS) : spmm256f_2(SPMM_ARGS); break;
                    case 4: h ? spmm256h_4(SPMM_ARGS) : spmm256f_4(SPMM_ARGS); break;
                    default: h ? spmm256h_8(SPMM_ARGS) : spmm256f_8(SPMM_ARGS); break;
                }
            }
#undef SPMM_ARGS
        }
    }
    spmm_store_y(a, YT, Bp, t0, bc, r0, r1);
#ifdef _OPENMP
    if (nth > 1) {
#pragma omp barrier
    }
#endif
#else
    (void)a; (void)isa; (void)XT; (void)YT; (void)t0; (void)bc; (void)nth; (void)tid;
#endif
}

/* Which kernel a batch uses when kind == KIND_AUTO (see docs/kernels.md for the measurements). */
static int auto_kind(int isa, int dtype, int batch, int p16, int m) {
    if (isa < ISA_AVX512) return KIND_SPMM;
    if (dtype == DT_BF16) {
        if (isa < ISA_AVX512BF16) return KIND_SPMM;
        /* Half density: the gather kernel from 2 tokens (4096x4096 2:4 cold: 1.1 vs 1.6 ms at 4
         * tokens, 2.4 vs 2.9 ms at 16); otherwise the expand GEMV, which beats the fp32-widening
         * SpMM at every batch measured (1:4, 16 tokens: 2.4 vs 2.8 ms; 64: 7.1 vs 8.1 ms).
         * 2:4 from 13 tokens: the pair-table kernel, whose time is flat up to 16 tokens (one token
         * vector) while the gather kernel's grows with the batch. Cold, 1 thread, gather vs pair,
         * ms for 2048x2048 / 4096x4096 / 11008x4096: 12 tokens 0.44/1.63/4.57 vs 0.46/1.72/4.56,
         * 14: 0.49/1.87/5.06 vs 0.46/1.73/4.49, 32: 0.95/3.74/9.90 vs 0.64/2.41/6.74, 64:
         * 1.77/6.76/18.1 vs 1.18/4.42/12.2, 128: 3.48/13.1/34.4 vs 2.31/8.67/23.7. */
        if (p16 == 8 && m == 4 && batch >= 13) return KIND_PAIR;
        return p16 == 8 && batch >= 2 ? KIND_GATHER : KIND_GEMV;
    }
    /* GEMV (dense products of expanded weights, 4 tokens per pass) vs SpMM (kept products only, one
     * broadcast per 16 tokens): the SpMM from 5 tokens (4096x4096 cold, 2:4: 2.9 vs 3.2 ms at 5
     * tokens, 3.1 vs 5.0 ms at 16; 1:4: 2.0 vs 2.1 ms at 5); at 4 the GEMV (2.0 vs ~3.0 ms). */
    (void)p16; (void)m;
    return batch <= 4 ? KIND_GEMV : KIND_SPMM;
}

/* Kept multiply-adds a call needs per thread before it is split over threads. Waking a thread
 * costs microseconds on a quiet machine but a scheduler slice on an oversubscribed one. 64K
 * measured best on the quiet 2-vCPU development VM: SmolLM2-135M 2:4 decode at 2 threads went
 * from 1.57x to 1.81x dense (fp32) and from 1.33x to 1.45x (bf16) against 1M. The environment
 * variable NMKIT_MIN_THREAD_WORK overrides it (e.g. 1048576 on a busy machine). */
static int64_t min_work_per_thread(void) {
    static int64_t cached = 0;
    if (!cached) {
        const char *env = getenv("NMKIT_MIN_THREAD_WORK");
        long long v = env ? atoll(env) : 0;
        cached = v > 0 ? (int64_t)v : (int64_t)1 << 16;
    }
    return cached;
}

/* y = x @ W^T. Returns 0 on success, -1 for an ISA this CPU lacks, -2 for bad arguments,
 * -3 when scratch memory cannot be allocated. isa: 0 portable, 1 avx2, 2 avx512, 3 avx512+bf16.
 * m: the pattern's group size M (0 if unknown); the pair-table kernel needs 2:4 (p16 8, m 4). */
int nmk_linear(int isa, int kind, int dtype, const void *values, const uint8_t *mask, int rows, int kp,
               int p16, int m, const void *x, int64_t ldx, int batch, void *y, int64_t ldy, int nthreads) {
    if (isa > nmk_best_isa()) return -1;
    if (rows <= 0 || kp <= 0 || kp % 32 || p16 < 1 || p16 > 16 || batch < 0 || ldx < kp || ldy < rows)
        return -2;
    if (dtype != DT_F32 && dtype != DT_BF16) return -2;
    if (batch == 0) return 0;
    nmk_args a = {dtype, values, mask, rows, kp, p16, x, ldx, batch, y, ldy};
    int nth = nthreads < 1 ? 1 : nthreads;
    int64_t work = (int64_t)rows * (kp / 16) * p16 * batch, min_work = min_work_per_thread();
    if (nth > 1 && work / nth < min_work) nth = work / min_work > 1 ? (int)(work / min_work) : 1;
    if (nth > (rows + 3) / 4) nth = (rows + 3) / 4;
    if (kind == KIND_AUTO) kind = auto_kind(isa, dtype, batch, p16, m);
    if (kind == KIND_GEMV && (isa < ISA_AVX512 || (dtype == DT_BF16 && isa < ISA_AVX512BF16)))
        kind = KIND_SPMM;
    if ((kind == KIND_GATHER || kind == KIND_PAIR) && !(dtype == DT_BF16 && isa >= ISA_AVX512BF16 && p16 == 8))
        kind = KIND_SPMM;
    if (kind == KIND_PAIR && m != 4) kind = KIND_GATHER; /* half density, but not groups of 4 */
    if (isa == ISA_PORTABLE) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
        {
            int r0, r1;
            thread_rows(rows, omp_get_num_threads(), omp_get_thread_num(), &r0, &r1);
            portable_rows(&a, r0, r1);
        }
#else
        portable_rows(&a, 0, rows);
#endif
        return 0;
    }
#ifdef NMK_X86
    if (kind == KIND_PAIR) {
        /* Token chunks of at most PAIR_MAXV vectors, the vectors spread evenly (65 tokens: 48 + 17) */
        const int nvt = (batch + 15) / 16, nc = (nvt + PAIR_MAXV - 1) / PAIR_MAXV, nvmax = (nvt + nc - 1) / nc;
        const int nu = kp / 32;
        const size_t tabv = (size_t)nu * 48 * nvmax; /* table vectors per thread */
        __m512i *tab = (__m512i *)aligned_alloc(64, (size_t)nth * tabv * 64);
        float *accs = (float *)aligned_alloc(64, (size_t)nth * PAIR_ROWS * nvmax * 64);
        if (!tab || !accs) {
            free(tab);
            free(accs);
            return -3;
        }
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
        {
            int tid = 0, n = 1;
#ifdef _OPENMP
            tid = omp_get_thread_num();
            n = omp_get_num_threads();
#endif
            int r0, r1;
            thread_rows(rows, n, tid, &r0, &r1);
            for (int ci = 0, t0 = 0; ci < nc; ci++) {
                const int nv = nvt / nc + (ci < nvt % nc), bc = batch - t0 < 16 * nv ? batch - t0 : 16 * nv;
                /* Each thread builds its own table: the build is cheap (~3 values per column and
                 * token), each core then reads it from its own L2, and no barrier waits for a
                 * preempted thread. */
                __m512i *tt = tab + (size_t)tid * tabv;
                pair_table(&a, tt, nv, t0, bc, 0, nu);
                pair_bf16_512(&a, tt, nv, t0, bc, r0, r1, accs + (size_t)tid * PAIR_ROWS * nvmax * 16);
                t0 += bc;
            }
        }
        free(tab);
        free(accs);
        return 0;
    }
    if (kind == KIND_GATHER) {
        const size_t per = gather_scratch(batch); /* vectors per thread */
        __m512i *scratch = (__m512i *)aligned_alloc(64, (size_t)nth * per * 64);
        if (!scratch) return -3;
        /* Beyond 4 tokens, x is copied with a row stride of kp + 64 elements: with a stride that is a
         * multiple of 4 KB (kp = 2048, 4096, ...) every token's columns fall into the same L1 sets and
         * 16 tokens overflow its 12 ways, so the x tile was evicted between row blocks. */
        uint16_t *xc = 0;
        if (batch > 4) {
            const int64_t ldc = (int64_t)kp + 64;
            xc = (uint16_t *)aligned_alloc(64, (size_t)batch * ldc * 2 + 64);
            if (!xc) {
                free(scratch);
                return -3;
            }
            for (int t = 0; t < batch; t++)
                memcpy(xc + t * ldc, (const uint16_t *)x + t * ldx, (size_t)kp * 2);
            a.x = xc;
            a.ldx = ldc;
        }
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
        {
            int r0 = 0, r1 = rows, tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
            thread_rows(rows, omp_get_num_threads(), tid, &r0, &r1);
#endif
            gather_bf16_512(&a, r0, r1, scratch + (size_t)tid * per);
        }
        free(scratch);
        free(xc);
        return 0;
    }
    if (kind == KIND_GEMV) {
        float *accs = 0;
        if (dtype == DT_F32 && !(accs = (float *)aligned_alloc(64, (size_t)nth * gemv_scratch(batch) * 64)))
            return -3;
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
        {
            int r0 = 0, r1 = rows, tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
            thread_rows(rows, omp_get_num_threads(), tid, &r0, &r1);
#endif
            if (dtype == DT_F32)
                gemv_f32_512(&a, r0, r1, accs + (size_t)tid * gemv_scratch(batch) * 16);
            else
                gemv_bf16_512(&a, r0, r1);
        }
        free(accs);
        return 0;
    }
    /* SpMM over token chunks of up to 64 (AVX-512) / 64 (AVX2). */
    const int chunk = 64;
    const int Bp = spmm_nv(isa, batch < chunk ? batch : chunk) * spmm_vw(isa);
    float *XT = (float *)aligned_alloc(64, (size_t)kp * Bp * 4 + 64);
    float *YT = (float *)aligned_alloc(64, (size_t)((rows + 3) / 4 * 4) * Bp * 4 + 64);
    if (!XT || !YT) {
        free(XT);
        free(YT);
        return -3;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nth) if (nth > 1)
#endif
    {
        int tid = 0, n = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        for (int t0 = 0; t0 < batch; t0 += chunk) {
            int bc = batch - t0 < chunk ? batch - t0 : chunk;
            spmm_chunk(&a, isa, XT, YT, t0, bc, n, tid);
        }
    }
    free(XT);
    free(YT);
    return 0;
#else
    return -1;
#endif
}

#define NMK_TOPN_MAXM 64
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NMK_TOPN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NMK_TOPN_CLONES
#endif
#define NMK_TOPN_INLINE static inline __attribute__((always_inline)) /* inlined into every clone */

/* ---- Row-wise top-N of every M, in place (run-time N:M: attention scores) ----------------------
 * Compiled for AVX-512, AVX2 and the baseline with target_clones (picked at load time, no -march).
 * In every group of m consecutive floats keep the n largest and overwrite the rest with `fill`
 * (e.g. -inf before a softmax). Rank of v[i] = #{j < i: v[j] >= v[i]} + #{j > i: v[j] > v[i]}, the
 * same "lower index wins ties" rule as the torch reference (nmkit.solvers.nm.topk_mask). m is a
 * compile-time constant in the common cases so the rank loops unroll into branch-free compares. */
NMK_TOPN_INLINE void topn_group(float *p, int m, int n, float fill) {
    float v[NMK_TOPN_MAXM];
    int r[NMK_TOPN_MAXM];
    for (int i = 0; i < m; ++i) { v[i] = p[i]; r[i] = 0; }
    for (int i = 0; i < m; ++i)
        for (int j = i + 1; j < m; ++j) {
            int ge = v[i] >= v[j]; /* i ranks ahead of the later j on ties */
            r[j] += ge;
            r[i] += !ge;
        }
    for (int i = 0; i < m; ++i) p[i] = r[i] < n ? v[i] : fill;
}

#define TOPN_FIXED(M)                                                              \
    NMK_TOPN_CLONES static void topn_fill_##M(float *x, int64_t g0, int64_t g1, int n, float fill) { \
        for (int64_t g = g0; g < g1; ++g) topn_group(x + g * M, M, n, fill);       \
    }
TOPN_FIXED(2)
TOPN_FIXED(4)
TOPN_FIXED(8)
TOPN_FIXED(16)

static void topn_fill_any(float *x, int64_t g0, int64_t g1, int m, int n, float fill) {
    for (int64_t g = g0; g < g1; ++g) topn_group(x + g * m, m, n, fill);
}

int nmk_topn_fill(float *x, int64_t groups, int m, int n, float fill, int threads) {
    if (m < 1 || m > NMK_TOPN_MAXM || n < 0 || groups < 0) return 1;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int nth = 1, tid = 0;
#ifdef _OPENMP
        nth = omp_get_num_threads();
        tid = omp_get_thread_num();
#endif
        int64_t g0 = groups * tid / nth, g1 = groups * (tid + 1) / nth;
        switch (m) {
        case 2: topn_fill_2(x, g0, g1, n, fill); break;
        case 4: topn_fill_4(x, g0, g1, n, fill); break;
        case 8: topn_fill_8(x, g0, g1, n, fill); break;
        case 16: topn_fill_16(x, g0, g1, n, fill); break;
        default: topn_fill_any(x, g0, g1, m, n, fill);
        }
    }
    return 0;
}
