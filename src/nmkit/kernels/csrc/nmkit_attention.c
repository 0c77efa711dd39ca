/* Fused DFSS N:M attention on CPU (fp32): out = softmax(topN-of-M(Q K^T * scale)) V, flash style.
 *
 * Part of the kernels' ctypes library (nmkit/kernels/native.py, nmk_nm_attention). Semantics are those
 * of the torch reference (nmkit.dynamic.attention): in every group of M consecutive keys (groups start
 * at key 0) each query keeps the N largest scores, ties to the lower key index; keys after a query
 * (is_causal, top-left aligned) and past the end count as -inf *before* the selection, so they lose to
 * every real score and a last partial group keeps at most N. The query is scaled first (q * scale in
 * fp32, as the reference does), so the scores differ from the reference's only by the order of the
 * dot product's additions.
 *
 * Tiled kernel (AVX-512, and AVX2 for M dividing 8), per work unit (batch, key/value head, block of
 * QB query rows of every query head sharing that key/value head, so grouped-query heads read the
 * same K/V, never a repeated copy):
 *   for each tile of 64 keys (K packed once per call into [tile][E][64] panels):
 *     for each query head of the group and each register tile of 6 query rows:
 *       S = Q K^T (6 x 64: 24 zmm accumulators, or four 6 x 16 blocks of 12 ymm; the panel in L1),
 *       causal / length mask to -inf, per row the N:M selection in registers (each lane's rank in
 *       its group by in-register rotations; 2:4 from the 6 pairwise comparisons of a group),
 *       kept scores compressed (vcompressps, or a vpermps table) and the kept keys as a bitmask, online
 *       softmax (running max, rescaling only when it grows, and lane-wise running sums), and P V
 *       over the kept keys only (N/M of the dense FMAs). The stages run over the tile's 6 rows in
 *       turn, so that the rows' dependency chains overlap.
 * The portable path (other CPUs, AVX2 with M = 16) computes one query row at a time in plain C: the
 * C reference of the same rules, slower than torch's batched matmuls, so nm_attention does not
 * dispatch to it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NMA_X86 1
#endif

enum { NMA_PORTABLE = 0, NMA_AVX2 = 1, NMA_AVX512 = 2 };

typedef struct {
    int n, m, batch, hq, hkv, L, S, E, Ev, causal;
    float scale;
    const float *q, *k, *v;
    float *o;
    int64_t qs[3], ks[3], vs[3], os[3]; /* element strides of (batch, head, row); the last dim is contiguous */
} nma_args;

static inline int imin(int a, int b) { return a < b ? a : b; }

/* Keys a query row may see: [0, limit). */
static inline int row_limit(const nma_args *a, int row) { return a->causal ? imin(row + 1, a->S) : a->S; }

/* ------------------------------------------------------------------ portable: one query row at a time */

/* Query row `row` of head h: its scores (keys it may not see are -inf up to the end of their group),
 * keep[j] by rank within each group of m (value desc, index asc, as nmk_topn_fill ranks), softmax
 * over the kept scores, P V. The row's largest score is kept (n >= 1), so it is the softmax's max. */
#define NMA_ROW_BODY                                                                                      \
    const int G = a->hq / a->hkv, lim = row_limit(a, row), padded = (lim + a->m - 1) / a->m * a->m;      \
    const float *Q = a->q + (int64_t)b * a->qs[0] + (int64_t)h * a->qs[1] + (int64_t)row * a->qs[2];       \
    const float *K = a->k + (int64_t)b * a->ks[0] + (int64_t)(h / G) * a->ks[1];                          \
    const float *V = a->v + (int64_t)b * a->vs[0] + (int64_t)(h / G) * a->vs[1];                          \
    float *O = a->o + (int64_t)b * a->os[0] + (int64_t)h * a->os[1] + (int64_t)row * a->os[2];             \
    for (int e = 0; e < a->E; e++) qrow[e] = Q[e] * a->scale;                                             \
    float mx = -INFINITY;                                                                                 \
    for (int j = 0; j < padded; j++) {                                                                    \
        float s = -INFINITY;                                                                              \
        if (j < lim) {                                                                                    \
            const float *kr = K + (int64_t)j * a->ks[2];                                                  \
            s = 0.f;                                                                                      \
            for (int e = 0; e < a->E; e++) s += qrow[e] * kr[e];                                          \
        }                                                                                                 \
        sc[j] = s;                                                                                        \
        mx = s > mx ? s : mx;                                                                             \
    }                                                                                                     \
    for (int g0 = 0; g0 < padded; g0 += a->m)                                                             \
        for (int i = g0; i < g0 + a->m; i++) {                                                            \
            int rank = 0;                                                                                 \
            for (int j = g0; j < g0 + a->m; j++)                                                          \
                rank += j < i ? sc[j] >= sc[i] : (j > i && sc[j] > sc[i]);                                \
            keep[i] = rank < a->n && i < lim;                                                             \
        }                                                                                                 \
    for (int e = 0; e < a->Ev; e++) acc[e] = 0.f;                                                         \
    float sum = 0.f;                                                                                      \
    for (int j = 0; j < lim; j++) {                                                                       \
        if (!keep[j]) continue;                                                                           \
        float p = expf(sc[j] - mx);                                                                       \
        sum += p;                                                                                         \
        const float *vr = V + (int64_t)j * a->vs[2];                                                      \
        for (int e = 0; e < a->Ev; e++) acc[e] += p * vr[e];                                              \
    }                                                                                                     \
    for (int e = 0; e < a->Ev; e++) O[e] = acc[e] / sum;

static void nma_row_portable(const nma_args *a, int b, int h, int row, float *qrow, float *sc, char *keep, float *acc) {
    NMA_ROW_BODY
}

#ifdef NMA_X86
#define NMA_T256 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
static NMA_T256 void nma_row_avx2(const nma_args *a, int b, int h, int row, float *qrow, float *sc, char *keep,
                                  float *acc) {
    NMA_ROW_BODY
}
#endif

static int nma_portable(const nma_args *a, int isa, int threads) {
    const int64_t rows = (int64_t)a->batch * a->hq * a->L;
    const int padded = (a->S + a->m - 1) / a->m * a->m;
    int bad = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *qrow = malloc(sizeof(float) * (size_t)(a->E + a->Ev + padded));
        char *keep = malloc((size_t)padded);
        if (!qrow || !keep) {
#pragma omp atomic write
            bad = 1;
        }
#pragma omp barrier
        if (!bad) { /* every thread or none meets the worksharing loop */
            float *acc = qrow + a->E, *sc = acc + a->Ev;
#pragma omp for schedule(dynamic, 16)
            for (int64_t r = 0; r < rows; r++) {
                int row = (int)(r % a->L), h = (int)(r / a->L % a->hq), b = (int)(r / a->L / a->hq);
#ifdef NMA_X86
                if (isa >= NMA_AVX2) {
                    nma_row_avx2(a, b, h, row, qrow, sc, keep, acc);
                    continue;
                }
#endif
                (void)isa;
                nma_row_portable(a, b, h, row, qrow, sc, keep, acc);
            }
        }
        free(qrow);
        free(keep);
    }
    return bad ? 2 : 0;
}

#ifdef NMA_X86
/* ------------------------------------------------------------------ tiled kernel, shared parts */
#define KT 64 /* keys per tile */
#define MR 6  /* query rows per register tile */
#define QB 48 /* query rows per work unit and query head (a multiple of MR and of 16) */
#define NMA_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi,bmi2,popcnt,fma")))
#define NMA_INLINE512 static inline __attribute__((always_inline)) NMA_T512
#define NMA_INLINE256 static inline __attribute__((always_inline)) NMA_T256

/* The N:M selection of one register of W scores (M divides W): rank of lane i = #{j in its group that
 * beat it}, j beating i when s[j] > s[i], or s[j] == s[i] and j < i; kept when rank < N. rot[t]
 * rotates each group by t + 1 lanes; bit l of wrap[t] marks the lanes whose partner has the lower
 * index. lut (AVX2): for each 8-bit mask, the lanes to gather to compress them to the front. */
typedef struct {
    int n, m, two_of_four;
    int32_t rot[15][16];
    unsigned wrap[15];
    const int32_t (*lut)[8];
} nm_sel;

static void nm_sel_init(nm_sel *sel, int n, int m, int width) {
    sel->n = n, sel->m = m, sel->two_of_four = n == 2 && m == 4, sel->lut = 0;
    for (int t = 0; t < m - 1; t++) {
        sel->wrap[t] = 0;
        for (int l = 0; l < width; l++) {
            int pos = l % m, other = (pos + t + 1) % m;
            sel->rot[t][l] = l - pos + other;
            if (other < pos) sel->wrap[t] |= 1u << l;
        }
    }
}

/* 2:4 from the three forward comparisons of each group (c1: lane i+1 vs i at lanes 0-2; c2: lane i+2
 * vs i at lanes 0-1; c3: lane 3 vs lane 0), f_ij = (s_j > s_i) meaning "j beats i" and its negation
 * "i beats j"; a lane is kept unless two of the other three beat it. R repeats the 4-bit pattern. */
static inline unsigned keep_2of4(unsigned f1, unsigned f2, unsigned f3, unsigned R) {
    unsigned b1 = f1 | ((~f3 & R) << 3);               /* lane i+1 beats i (i = 3: lane 0) */
    unsigned b2 = f2 | ((~f2 & 3 * R) << 2);           /* lane i+2 beats i */
    unsigned b3 = f3 | ((~f1 & 7 * R) << 1);           /* lane i-1 beats i (i = 0: lane 3) */
    return ~((b1 & b2) | (b1 & b3) | (b2 & b3)) & 15 * R;
}

/* ------------------------------------------------------------------ AVX-512 pieces (16 lanes) */
/* exp(x) for x <= 0: Cephes expf polynomial on x - n ln2, then vscalefps by n. */
NMA_INLINE512 __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

/* S[MR][KT] = the MR query rows q[i] (E features) times the key panel [E][KT]: 24 zmm accumulators. */
NMA_INLINE512 void qk_tile_512(const float *const *q, const float *panel, int E, float *S) {
    __m512 c[MR][4];
    for (int i = 0; i < MR; i++)
        for (int z = 0; z < 4; z++) c[i][z] = _mm512_setzero_ps();
    for (int e = 0; e < E; e++, panel += KT) {
        __m512 k0 = _mm512_load_ps(panel), k1 = _mm512_load_ps(panel + 16), k2 = _mm512_load_ps(panel + 32),
               k3 = _mm512_load_ps(panel + 48);
        for (int i = 0; i < MR; i++) {
            __m512 x = _mm512_set1_ps(q[i][e]);
            c[i][0] = _mm512_fmadd_ps(x, k0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(x, k1, c[i][1]);
            c[i][2] = _mm512_fmadd_ps(x, k2, c[i][2]);
            c[i][3] = _mm512_fmadd_ps(x, k3, c[i][3]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int z = 0; z < 4; z++) _mm512_store_ps(S + i * KT + 16 * z, c[i][z]);
}

NMA_INLINE512 __mmask16 select_512(const nm_sel *sel, __m512 s) {
    if (sel->two_of_four) {
        __mmask16 c1 = _mm512_mask_cmp_ps_mask(0x7777, _mm512_permute_ps(s, _MM_SHUFFLE(0, 3, 2, 1)), s, _CMP_GT_OQ);
        __mmask16 c2 = _mm512_mask_cmp_ps_mask(0x3333, _mm512_permute_ps(s, _MM_SHUFFLE(1, 0, 3, 2)), s, _CMP_GT_OQ);
        __mmask16 c3 = _mm512_mask_cmp_ps_mask(0x1111, _mm512_permute_ps(s, _MM_SHUFFLE(2, 1, 0, 3)), s, _CMP_GT_OQ);
        return (__mmask16)keep_2of4(c1, c2, c3, 0x1111u);
    }
    if (sel->n >= sel->m) return 0xffff;
    __m512i rank = _mm512_setzero_si512();
    for (int t = 0; t < sel->m - 1; t++) {
        __m512 o = _mm512_permutexvar_ps(_mm512_loadu_si512(sel->rot[t]), s);
        __mmask16 w = (__mmask16)sel->wrap[t];
        __mmask16 beat = _mm512_mask_cmp_ps_mask(w, o, s, _CMP_GE_OQ) |
                         _mm512_mask_cmp_ps_mask((__mmask16)~w, o, s, _CMP_GT_OQ);
        rank = _mm512_mask_add_epi32(rank, beat, rank, _mm512_set1_epi32(1));
    }
    return _mm512_cmplt_epi32_mask(rank, _mm512_set1_epi32(sel->n));
}

/* One query row of S against its key tile: keys at or past lim count as -inf; the kept scores are
 * compressed into ps (room for KT + 16) and the kept keys' bits set in *keep (bit j: key j0 + j).
 * Returns their count; *m becomes max(*m, the row's largest visible score). */
NMA_INLINE512 int select_row_512(const nm_sel *sel, const float *s, int j0, int lim, float *ps, uint64_t *keep,
                                 float *m) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 best = ninf;
    uint64_t bits = 0;
    int cnt = 0;
    for (int z = 0; z < 4; z++) {
        int valid = lim - j0 - 16 * z;
        if (valid <= 0) break;
        __mmask16 vm = valid >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1u);
        __m512 x = _mm512_mask_load_ps(ninf, vm, s + 16 * z);
        __mmask16 k = select_512(sel, x) & vm;
        best = _mm512_max_ps(best, x);
        _mm512_storeu_ps(ps + cnt, _mm512_maskz_compress_ps(k, x));
        bits |= (uint64_t)k << 16 * z;
        cnt += __builtin_popcount(k);
    }
    *keep = bits;
    if (_mm512_cmp_ps_mask(best, _mm512_set1_ps(*m), _CMP_GT_OQ)) *m = _mm512_reduce_max_ps(best);
    return cnt;
}

/* p[0, cnt) = exp(p - m); l[0, 16) = alpha * l + their lane-wise partial sums. */
NMA_INLINE512 void exp_row_512(float *p, int cnt, float m, float alpha, float *l) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_mul_ps(_mm512_load_ps(l), _mm512_set1_ps(alpha));
    for (int e = 0; e < cnt; e += 16) {
        __m512 x = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + e), mv));
        if (cnt - e < 16) x = _mm512_maskz_mov_ps((__mmask16)((1u << (cnt - e)) - 1u), x);
        _mm512_storeu_ps(p + e, x);
        sum = _mm512_add_ps(sum, x);
    }
    _mm512_store_ps(l, sum);
}

/* o[0, NZ*16) (last zmm masked by tail) = alpha * o + sum_e p[e] V[e-th set bit of keep] (V: the
 * tile's first value row, ldv apart). Two accumulator sets (even and odd entries) keep eight FMA
 * chains in flight at NZ = 4. */
NMA_INLINE512 void pv_chunk_512(float *o, const float *V, int64_t ldv, const float *p, uint64_t keep, int cnt,
                                float alpha, const int NZ, const int masked, __mmask16 tail) {
    __m512 a[4], b[4];
#define NMA_LD(ptr, z) (masked && z == NZ - 1 ? _mm512_maskz_loadu_ps(tail, ptr) : _mm512_loadu_ps(ptr))
    for (int z = 0; z < NZ; z++) {
        a[z] = NMA_LD(o + 16 * z, z);
        if (alpha != 1.f) a[z] = _mm512_mul_ps(a[z], _mm512_set1_ps(alpha));
        b[z] = _mm512_setzero_ps();
    }
    int e = 0;
    for (; e + 1 < cnt; e += 2) {
        const float *v0 = V + __builtin_ctzll(keep) * ldv;
        keep &= keep - 1;
        const float *v1 = V + __builtin_ctzll(keep) * ldv;
        keep &= keep - 1;
        __m512 p0 = _mm512_set1_ps(p[e]), p1 = _mm512_set1_ps(p[e + 1]);
        for (int z = 0; z < NZ; z++) {
            a[z] = _mm512_fmadd_ps(p0, NMA_LD(v0 + 16 * z, z), a[z]);
            b[z] = _mm512_fmadd_ps(p1, NMA_LD(v1 + 16 * z, z), b[z]);
        }
    }
    if (e < cnt) {
        const float *v0 = V + __builtin_ctzll(keep) * ldv;
        __m512 p0 = _mm512_set1_ps(p[e]);
        for (int z = 0; z < NZ; z++) a[z] = _mm512_fmadd_ps(p0, NMA_LD(v0 + 16 * z, z), a[z]);
    }
#undef NMA_LD
    for (int z = 0; z < NZ; z++) {
        __m512 r = _mm512_add_ps(a[z], b[z]);
        if (masked && z == NZ - 1)
            _mm512_mask_storeu_ps(o + 16 * z, tail, r);
        else
            _mm512_storeu_ps(o + 16 * z, r);
    }
}

NMA_INLINE512 void pv_row_512(float *o, int Ev, const float *V, int64_t ldv, const float *p, uint64_t keep, int cnt,
                              float alpha) {
    if (Ev == 64) { /* the common head size: one pass, no masks */
        pv_chunk_512(o, V, ldv, p, keep, cnt, alpha, 4, 0, 0xffff);
        return;
    }
    for (int c = 0; c < Ev; c += 64, o += 64, V += 64) {
        int w = imin(64, Ev - c), nz = (w + 15) / 16;
        __mmask16 tail = (__mmask16)(w % 16 ? (1u << (w % 16)) - 1u : 0xffffu);
        switch (nz) {
        case 4: pv_chunk_512(o, V, ldv, p, keep, cnt, alpha, 4, 1, tail); break;
        case 3: pv_chunk_512(o, V, ldv, p, keep, cnt, alpha, 3, 1, tail); break;
        case 2: pv_chunk_512(o, V, ldv, p, keep, cnt, alpha, 2, 1, tail); break;
        default: pv_chunk_512(o, V, ldv, p, keep, cnt, alpha, 1, 1, tail); break;
        }
    }
}

/* ------------------------------------------------------------------ AVX2 pieces (8 lanes) */
/* exp(x) for x <= 0: the same polynomial, 2^n built in the exponent bits (x >= -87: n stays normal). */
NMA_INLINE256 __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* S[MR][KT] as four 6 x 16 blocks (12 ymm accumulators each). */
NMA_INLINE256 void qk_tile_256(const float *const *q, const float *panel, int E, float *S) {
    for (int c = 0; c < KT; c += 16) {
        __m256 acc[MR][2];
        for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        const float *pk = panel + c;
        for (int e = 0; e < E; e++, pk += KT) {
            __m256 k0 = _mm256_load_ps(pk), k1 = _mm256_load_ps(pk + 8);
            for (int i = 0; i < MR; i++) {
                __m256 x = _mm256_broadcast_ss(q[i] + e);
                acc[i][0] = _mm256_fmadd_ps(x, k0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(x, k1, acc[i][1]);
            }
        }
        for (int i = 0; i < MR; i++) {
            _mm256_store_ps(S + i * KT + c, acc[i][0]);
            _mm256_store_ps(S + i * KT + c + 8, acc[i][1]);
        }
    }
}

NMA_INLINE256 unsigned select_256(const nm_sel *sel, __m256 s) {
    if (sel->two_of_four) {
        unsigned c1 = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_permute_ps(s, _MM_SHUFFLE(0, 3, 2, 1)), s, _CMP_GT_OQ));
        unsigned c2 = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_permute_ps(s, _MM_SHUFFLE(1, 0, 3, 2)), s, _CMP_GT_OQ));
        unsigned c3 = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_permute_ps(s, _MM_SHUFFLE(2, 1, 0, 3)), s, _CMP_GT_OQ));
        return keep_2of4(c1 & 0x77u, c2 & 0x33u, c3 & 0x11u, 0x11u);
    }
    if (sel->n >= sel->m) return 0xffu;
    __m256i rank = _mm256_setzero_si256();
    for (int t = 0; t < sel->m - 1; t++) {
        __m256 o = _mm256_permutevar8x32_ps(s, _mm256_loadu_si256((const __m256i *)sel->rot[t]));
        const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        __m256 w = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)sel->wrap[t]), bit),
                                                          bit));
        __m256 beat = _mm256_blendv_ps(_mm256_cmp_ps(o, s, _CMP_GT_OQ), _mm256_cmp_ps(o, s, _CMP_GE_OQ), w);
        rank = _mm256_sub_epi32(rank, _mm256_castps_si256(beat)); /* a true compare is -1 */
    }
    return (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(sel->n), rank)));
}

NMA_INLINE256 int select_row_256(const nm_sel *sel, const float *s, int j0, int lim, float *ps, uint64_t *keep,
                                 float *m) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 best = ninf;
    uint64_t bits = 0;
    int cnt = 0;
    for (int z = 0; z < KT / 8; z++) {
        int valid = lim - j0 - 8 * z;
        if (valid <= 0) break;
        __m256 x = _mm256_loadu_ps(s + 8 * z);
        unsigned vm = 0xffu;
        if (valid < 8) {
            __m256 in = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid), iota));
            x = _mm256_blendv_ps(ninf, x, in);
            vm = (1u << valid) - 1u;
        }
        unsigned k = select_256(sel, x) & vm;
        best = _mm256_max_ps(best, x);
        _mm256_storeu_ps(ps + cnt, _mm256_permutevar8x32_ps(x, _mm256_loadu_si256((const __m256i *)sel->lut[k])));
        bits |= (uint64_t)k << 8 * z;
        cnt += __builtin_popcount(k);
    }
    *keep = bits;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(best), _mm256_extractf128_ps(best, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float mx = _mm_cvtss_f32(h);
    if (mx > *m) *m = mx;
    return cnt;
}

NMA_INLINE256 void exp_row_256(float *p, int cnt, float m, float alpha, float *l) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_mul_ps(_mm256_load_ps(l), _mm256_set1_ps(alpha));
    for (int e = 0; e < cnt; e += 8) {
        __m256 x = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + e), mv));
        if (cnt - e < 8)
            x = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(cnt - e),
                                                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
        _mm256_storeu_ps(p + e, x);
        sum = _mm256_add_ps(sum, x);
    }
    _mm256_store_ps(l, sum);
}

/* o[0, NZ*8) (last ymm masked by tail) = alpha * o + sum_e p[e] V[e-th set bit of keep]: NZ chains. */
NMA_INLINE256 void pv_chunk_256(float *o, const float *V, int64_t ldv, const float *p, uint64_t keep, int cnt,
                                float alpha, const int NZ, const int masked, __m256i tail) {
    __m256 a[8];
#define NMA_LD(ptr, z) (masked && z == NZ - 1 ? _mm256_maskload_ps(ptr, tail) : _mm256_loadu_ps(ptr))
    for (int z = 0; z < NZ; z++) a[z] = _mm256_mul_ps(NMA_LD(o + 8 * z, z), _mm256_set1_ps(alpha));
    for (int e = 0; e < cnt; e++, keep &= keep - 1) {
        const float *v0 = V + __builtin_ctzll(keep) * ldv;
        __m256 p0 = _mm256_broadcast_ss(p + e);
        for (int z = 0; z < NZ; z++) a[z] = _mm256_fmadd_ps(p0, NMA_LD(v0 + 8 * z, z), a[z]);
    }
#undef NMA_LD
    for (int z = 0; z < NZ; z++) {
        if (masked && z == NZ - 1)
            _mm256_maskstore_ps(o + 8 * z, tail, a[z]);
        else
            _mm256_storeu_ps(o + 8 * z, a[z]);
    }
}

NMA_INLINE256 void pv_row_256(float *o, int Ev, const float *V, int64_t ldv, const float *p, uint64_t keep, int cnt,
                              float alpha) {
    if (Ev == 64) {
        pv_chunk_256(o, V, ldv, p, keep, cnt, alpha, 8, 0, _mm256_setzero_si256());
        return;
    }
    for (int c = 0; c < Ev; c += 64, o += 64, V += 64) {
        int w = imin(64, Ev - c), nz = (w + 7) / 8, r = w % 8 ? w % 8 : 8;
        __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        switch (nz) {
        case 8: pv_chunk_256(o, V, ldv, p, keep, cnt, alpha, 8, 1, tail); break;
        case 7: pv_chunk_256(o, V, ldv, p, keep, cnt, alpha, 7, 1, tail); break;
        case 6: pv_chunk_256(o, V, ldv, p, keep, cnt, alpha, 6, 1, tail); break;
        case 5: pv_chunk_256(o, V, ldv, p, keep, cnt, alpha, 5, 1, tail); break;
        case 4: pv_chunk_256(o, V, ldv, p, keep, cnt, alpha, 4, 1, tail); break;
        case 3: pv_chunk_256(o, V, ldv, p, keep, cnt, alpha, 3, 1, tail); break;
        case 2: pv_chunk_256(o, V, ldv, p, keep, cnt, alpha, 2, 1, tail); break;
        default: pv_chunk_256(o, V, ldv, p, keep, cnt, alpha, 1, 1, tail); break;
        }
    }
}

/* ------------------------------------------------------------------ the tiled kernel */
/* K of every (batch, kv head) as [tile][E][KT] panels, zero past S. */
static void pack_keys(const nma_args *a, float *kp, int nt, int threads) {
    const int64_t panels = (int64_t)a->batch * a->hkv * nt, psize = (int64_t)a->E * KT;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t u = 0; u < panels; u++) {
        int t = (int)(u % nt), h = (int)(u / nt % a->hkv), b = (int)(u / nt / a->hkv);
        const float *K = a->k + (int64_t)b * a->ks[0] + (int64_t)h * a->ks[1];
        float *P = kp + u * psize;
        for (int jj = 0; jj < KT; jj++) {
            int j = t * KT + jj;
            if (j < a->S) {
                const float *kr = K + (int64_t)j * a->ks[2];
                for (int e = 0; e < a->E; e++) P[(int64_t)e * KT + jj] = kr[e];
            } else {
                for (int e = 0; e < a->E; e++) P[(int64_t)e * KT + jj] = 0.f;
            }
        }
    }
}

/* One work unit: batch b, kv head h, query rows [r0, r1) of each of its G query heads. Per row, ml
 * holds the running maximum (at 0) and, from 16 on, the running sum as 16 (or 8) partial lanes. */
#define NMA_UNIT(SFX, TARGET)                                                                                \
static TARGET void nma_unit_##SFX(const nma_args *a, const nm_sel *sel, const float *kp, int nt, int b, int h,  \
                                  int r0, int r1, float *qs, float *acc, float *ml, float *S, float *ps) {       \
    const int G = a->hq / a->hkv, E = a->E, Ev = a->Ev, rows = r1 - r0;                                          \
    const int kend = a->causal ? imin(a->S, r1) : a->S; /* keys any row of this unit may see */                  \
    const float *V = a->v + (int64_t)b * a->vs[0] + (int64_t)h * a->vs[1];                                      \
    const float *panels = kp + ((int64_t)b * a->hkv + h) * nt * E * KT;                                          \
    for (int g = 0; g < G; g++) {                                                                                \
        const float *Q = a->q + (int64_t)b * a->qs[0] + (int64_t)(h * G + g) * a->qs[1];                        \
        for (int r = 0; r < rows; r++) {                                                                         \
            const float *qr = Q + (int64_t)(r0 + r) * a->qs[2];                                                  \
            float *d = qs + ((int64_t)g * QB + r) * E, *m = ml + 32 * (g * QB + r);                              \
            for (int e = 0; e < E; e++) d[e] = qr[e] * a->scale; /* as the reference scales the query */        \
            memset(acc + ((int64_t)g * QB + r) * Ev, 0, sizeof(float) * (size_t)Ev);                             \
            memset(m, 0, 32 * sizeof(float));                                                                    \
            m[0] = -INFINITY;                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    for (int j0 = 0; j0 < kend; j0 += KT) {                                                                      \
        const float *panel = panels + (int64_t)(j0 / KT) * E * KT, *Vt = V + j0 * a->vs[2];                      \
        /* register tiles of MR rows over the unit's (head, row) pairs: decoding (one row) still fills them */ \
        for (int t0 = 0; t0 < G * rows; t0 += MR) {                                                              \
            int slot[MR], lim[MR], last = 0; /* row's scratch index, keys it may see (0: none, a padding row) */ \
            for (int i = 0; i < MR; i++) {                                                                       \
                int t = imin(t0 + i, G * rows - 1), r = t % rows;                                                \
                slot[i] = t / rows * QB + r;                                                                     \
                lim[i] = t0 + i < G * rows ? row_limit(a, r0 + r) : 0;                                           \
                last = lim[i] > last ? lim[i] : last;                                                            \
            }                                                                                                    \
            if (last <= j0) continue; /* every key of the tile after every row */                                \
            const float *qp[MR];                                                                                 \
            for (int i = 0; i < MR; i++) qp[i] = qs + (int64_t)slot[i] * E;                                      \
            qk_tile_##SFX(qp, panel, E, S);                                                                      \
            /* In stages over the tile's rows, so that the rows' dependency chains overlap. */                  \
            int cnt[MR];                                                                                         \
            float alpha[MR];                                                                                     \
            uint64_t keep[MR];                                                                                   \
            for (int i = 0; i < MR; i++) {                                                                       \
                cnt[i] = -1;                                                                                     \
                if (lim[i] <= j0) continue;                                                                      \
                float *m = ml + 32 * slot[i], old = m[0];                                                        \
                cnt[i] = select_row_##SFX(sel, S + i * KT, j0, lim[i], ps + i * (KT + 16), keep + i, m);         \
                alpha[i] = m[0] == old ? 1.f : old == -INFINITY ? 0.f : expf(old - m[0]);                        \
            }                                                                                                    \
            for (int i = 0; i < MR; i++)                                                                         \
                if (cnt[i] >= 0) {                                                                               \
                    float *m = ml + 32 * slot[i];                                                                \
                    exp_row_##SFX(ps + i * (KT + 16), cnt[i], m[0], alpha[i], m + 16);                           \
                }                                                                                                \
            for (int i = 0; i < MR; i++)                                                                         \
                if (cnt[i] >= 0)                                                                                 \
                    pv_row_##SFX(acc + (int64_t)slot[i] * Ev, Ev, Vt, a->vs[2], ps + i * (KT + 16), keep[i],     \
                                 cnt[i], alpha[i]);                                                              \
        }                                                                                                        \
    }                                                                                                            \
    for (int g = 0; g < G; g++) {                                                                                \
        float *O = a->o + (int64_t)b * a->os[0] + (int64_t)(h * G + g) * a->os[1];                              \
        for (int r = 0; r < rows; r++) {                                                                         \
            const float *s = acc + ((int64_t)g * QB + r) * Ev, *l = ml + 32 * (g * QB + r) + 16;                 \
            float sum = 0.f;                                                                                     \
            for (int e = 0; e < 16; e++) sum += l[e];                                                            \
            float *d = O + (int64_t)(r0 + r) * a->os[2];                                                         \
            for (int e = 0; e < Ev; e++) d[e] = s[e] / sum;                                                      \
        }                                                                                                        \
    }                                                                                                            \
}
NMA_UNIT(512, NMA_T512)
NMA_UNIT(256, NMA_T256)

static int nma_tiled(const nma_args *a, int isa, int threads) {
    nm_sel sel;
    nm_sel_init(&sel, a->n, a->m, isa >= NMA_AVX512 ? 16 : 8);
    int32_t(*lut)[8] = 0;
    if (isa < NMA_AVX512) { /* vpermps indices that pack the lanes of each 8-bit mask to the front */
        lut = malloc(256 * sizeof *lut);
        if (!lut) return 2;
        for (int k = 0; k < 256; k++) {
            int c = 0;
            for (int l = 0; l < 8; l++)
                if (k >> l & 1) lut[k][c++] = l;
            while (c < 8) lut[k][c++] = 0;
        }
        sel.lut = (const int32_t(*)[8])lut;
    }
    const int nt = (a->S + KT - 1) / KT, G = a->hq / a->hkv, nqb = (a->L + QB - 1) / QB;
    float *kp = aligned_alloc(64, sizeof(float) * (size_t)a->batch * a->hkv * nt * a->E * KT); /* 256-byte multiple */
    if (!kp) {
        free(lut);
        return 2;
    }
    pack_keys(a, kp, nt, threads);
    const int64_t heads = (int64_t)a->batch * a->hkv, units = heads * nqb;
    int bad = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        size_t qn = (size_t)G * QB * a->E, an = (size_t)G * QB * a->Ev; /* multiples of 16: QB is */
        size_t bn = MR * KT + MR * (KT + 16) + 32 * (size_t)G * QB + qn + an; /* 64-byte aligned parts */
        float *buf = aligned_alloc(64, sizeof(float) * bn);
        if (!buf) {
#pragma omp atomic write
            bad = 1;
        }
#pragma omp barrier
        if (!bad) { /* every thread or none meets the worksharing loop */
            float *S = buf, *ps = S + MR * KT, *ml = ps + MR * (KT + 16), *qs = ml + 32 * (size_t)G * QB;
            float *acc = qs + qn;
#pragma omp for schedule(dynamic, 1)
            for (int64_t u = 0; u < units; u++) {
                /* causal: the last query blocks (the most keys) first, so the small ones fill the gaps */
                int qb = nqb - 1 - (int)(u / heads), bh = (int)(u % heads);
                int r0 = qb * QB, r1 = imin(a->L, r0 + QB), b = bh / a->hkv, h = bh % a->hkv;
                if (isa >= NMA_AVX512)
                    nma_unit_512(a, &sel, kp, nt, b, h, r0, r1, qs, acc, ml, S, ps);
                else
                    nma_unit_256(a, &sel, kp, nt, b, h, r0, r1, qs, acc, ml, S, ps);
            }
        }
        free(buf);
    }
    free(kp);
    free(lut);
    return bad ? 2 : 0;
}
#endif /* NMA_X86 */

/* out[b, h, i, :] = DFSS N:M attention of query row i of head h (key/value head h / (hq / hkv)).
 * dims: n, m, batch, hq, hkv, L, S, E, Ev, causal; strides: q, k, v, o element strides of (batch, head,
 * row), 12 values; the last dimension of every tensor is contiguous.
 * Returns 0, or 1 for bad arguments, 2 when out of memory. */
int nmk_nm_attention(int isa, const int *dims, const int64_t *strides, const float *q, const float *k, const float *v,
                     float *o, float scale, int threads) {
    nma_args a;
    a.n = dims[0], a.m = dims[1], a.batch = dims[2], a.hq = dims[3], a.hkv = dims[4], a.L = dims[5], a.S = dims[6];
    a.E = dims[7], a.Ev = dims[8], a.causal = dims[9];
    a.scale = scale, a.q = q, a.k = k, a.v = v, a.o = o;
    for (int i = 0; i < 3; i++) {
        a.qs[i] = strides[i], a.ks[i] = strides[3 + i], a.vs[i] = strides[6 + i], a.os[i] = strides[9 + i];
    }
    if (a.m < 1 || a.m > 16 || 16 % a.m || a.n < 1 || a.batch < 0 || a.hkv < 1 || a.hq % a.hkv || a.L < 0 ||
        a.S < 1 || a.E < 1 || a.Ev < 1)
        return 1;
    if (threads < 1) threads = 1;
    if ((int64_t)a.batch * a.hq * a.L == 0) return 0;
#ifdef NMA_X86
    if (isa >= NMA_AVX512 || (isa == NMA_AVX2 && 8 % a.m == 0)) return nma_tiled(&a, isa, threads);
#endif
    return nma_portable(&a, isa, threads);
}

