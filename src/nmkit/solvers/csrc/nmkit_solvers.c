/* nmkit mask solvers: transposable N:M (every M x M tile keeps N per row and N per column).
 *
 * Plain C, no torch ABI, no -march flag; called through ctypes (nmkit/solvers/native.py).
 * Per tile (a bipartite b-matching, rows x columns, capacity N on both sides):
 *   1. greedy: entries by descending score (ties: lower flat index first, as the torch reference),
 *      kept while the row and the column have room  (mode 0 stops here: may keep < N);
 *   2. completion: augmenting paths (BFS over rows/columns) until every row and column keeps
 *      exactly N (always feasible: K_{M,M} has an N-regular subgraph);
 *   3. local search on the "row graph": W[k][i] = best gain of moving one kept column from row k to
 *      row i (max over l in K_k \ K_i of s[i][l] - s[k][l]). A 2-cycle k -> i -> k is the 2x2 swap
 *      (i,j),(k,l) -> (i,l),(k,j); the best one is applied while it gains (mode 1 stops here).
 *   4. mode 2 also cancels longer positive cycles (Bellman-Ford on the M-node row graph). A residual
 *      cycle of the flow problem maps to a row-graph cycle of at least its gain, and every simple
 *      row-graph cycle is a valid move, so "no positive row-graph cycle" is exactly LP optimality:
 *      mode 2 returns the optimum (up to a float tolerance relative to the tile's largest |score|).
 * Tiles are independent; OpenMP splits them over threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#else
static double omp_get_wtime(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static int omp_get_thread_num(void) { return 0; }
#endif

#define MAXM 64

/* The per-tile solver is compiled for AVX-512 and AVX2 as well as the baseline and picked at load
 * time (GCC ifunc), so the row-graph max-plus loops use the widest vectors without -march. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NMS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NMS_CLONES
#endif
#define NMS_INLINE static inline __attribute__((always_inline)) /* inlined into every clone */

/* Dummy module init so setuptools can build this as an extension module; Python never imports it. */
void *PyInit__solvers_native(void) { return 0; }

int nms_version(void) { return 1; }

typedef struct {
    int m, n;
    float s[MAXM * MAXM];      /* tile scores, row-major */
    uint64_t row[MAXM];        /* kept columns of each row */
    uint64_t col[MAXM];        /* kept rows of each column */
    int rc[MAXM], cc[MAXM];    /* kept counts */
    float w[MAXM][MAXM];       /* row graph: w[k][i] = gain of moving a column from row k to row i */
    float u[MAXM][MAXM], v[MAXM][MAXM];
    float tol;
} tile_t;

/* Order-preserving map float -> uint32 (descending scores = ascending keys), -0 == +0. */
static inline uint32_t desc_key(float x) {
    uint32_t u;
    if (x == 0.0f) x = 0.0f;
    memcpy(&u, &x, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* ascending in x */
    return ~u;                                        /* ascending in -x */
}

/* Stable LSD radix sort (4 x 8 bits) of the tile's cells by descending score (ties: lower flat index
 * first). Key and cell travel packed in one uint64 (cell = i << 6 | j, so no division later); the four
 * digit histograms come from one read pass. */
static void sort_desc(const float *s, int m, uint16_t *order) {
    int mm = m * m;
    uint64_t a[MAXM * MAXM], b[MAXM * MAXM];
    uint64_t *src = a, *dst = b;
    int cnt[4][256];
    memset(cnt, 0, sizeof(cnt));
    for (int i = 0, t = 0; i < m; i++)
        for (int j = 0; j < m; j++, t++) {
            uint64_t key = desc_key(s[t]);
            a[t] = (key << 16) | (uint64_t)(i << 6 | j);
            cnt[0][key & 255u]++; cnt[1][(key >> 8) & 255u]++;
            cnt[2][(key >> 16) & 255u]++; cnt[3][key >> 24]++;
        }
    for (int p = 0; p < 4; p++) {
        int shift = 16 + 8 * p, *c = cnt[p];
        if (c[(src[0] >> shift) & 255u] == mm) continue; /* one digit value: the pass is a no-op */
        int sum = 0;
        for (int d = 0; d < 256; d++) { int x = c[d]; c[d] = sum; sum += x; }
        for (int t = 0; t < mm; t++) dst[c[(src[t] >> shift) & 255u]++] = src[t];
        uint64_t *sw = src; src = dst; dst = sw;
    }
    for (int t = 0; t < mm; t++) order[t] = (uint16_t)(src[t] & 0xffffu);
}

static inline void keep_cell(tile_t *t, int i, int j) {
    t->row[i] |= 1ull << j; t->col[j] |= 1ull << i; t->rc[i]++; t->cc[j]++;
}

static int greedy(tile_t *t) {
    int m = t->m, n = t->n, mm = m * m, kept = 0;
    uint16_t order[MAXM * MAXM];
    sort_desc(t->s, m, order);
    for (int q = 0; q < mm && kept < n * m; q++) {
        int i = order[q] >> 6, j = order[q] & 63;
        if (t->rc[i] < n && t->cc[j] < n) { keep_cell(t, i, j); kept++; }
    }
    return kept;
}

/* One augmenting path from a deficient row to a deficient column: add (r, c1), remove (r1, c1),
 * add (r1, c2), ... add (r_k, c_end). Rows/columns are visited once (BFS), so the path is simple. */
static int augment(tile_t *t) {
    int m = t->m, n = t->n, r0 = -1;
    for (int i = 0; i < m; i++) if (t->rc[i] < n) { r0 = i; break; }
    if (r0 < 0) return 0;
    /* direct add first: the best free cell between a deficient row and a deficient column */
    int bi = -1, bj = -1; float bv = -INFINITY;
    uint64_t open_c = 0;
    for (int j = 0; j < m; j++) open_c |= (uint64_t)(t->cc[j] < n) << j;
    for (int i = 0; i < m; i++) {
        if (t->rc[i] >= n) continue;
        for (uint64_t c = open_c & ~t->row[i]; c; c &= c - 1) {
            int j = __builtin_ctzll(c);
            if (t->s[i * m + j] > bv) { bv = t->s[i * m + j]; bi = i; bj = j; }
        }
    }
    if (bi >= 0) { keep_cell(t, bi, bj); return 1; }
    int prow[MAXM], pcol[MAXM], queue[MAXM];
    uint64_t seen_r = 1ull << r0, seen_c = 0;
    int head = 0, tail = 0, end = -1;
    queue[tail++] = r0;
    uint64_t all = (m == 64) ? ~0ull : ((1ull << m) - 1);
    while (head < tail && end < 0) {
        int x = queue[head++];
        for (uint64_t cs = all & ~seen_c & ~t->row[x]; cs; cs &= cs - 1) {
            int c = __builtin_ctzll(cs);
            seen_c |= 1ull << c; pcol[c] = x;           /* reached column c by adding (x, c) */
            if (t->cc[c] < n) { end = c; break; }
            for (uint64_t ys = t->col[c] & ~seen_r; ys; ys &= ys - 1) { /* remove (y, c), go on from y */
                int y = __builtin_ctzll(ys);
                seen_r |= 1ull << y; prow[y] = c; queue[tail++] = y;
            }
        }
    }
    if (end < 0) return 0; /* cannot happen for a consistent tile */
    int c = end;
    for (;;) {
        int x = pcol[c];
        t->row[x] |= 1ull << c; t->col[c] |= 1ull << x;   /* add (x, c) */
        if (x == r0) break;
        int c2 = prow[x];                                /* x was reached by removing (x, c2) */
        t->row[x] &= ~(1ull << c2); t->col[c2] &= ~(1ull << x);
        c = c2;
    }
    t->rc[r0]++; t->cc[end]++;
    return 1;
}

/* Row-graph weights as a max-plus product: u[i][l] = s[i][l] where row i does not keep l (else -inf),
 * v[k][l] = -s[k][l] where row k keeps l (else -inf); w[k][i] = max_l u[i][l] + v[k][l]. */
NMS_INLINE void row_uv(tile_t *t, int i) {
    int m = t->m;
    const float *si = t->s + i * m;
    uint64_t r = t->row[i];
    for (int l = 0; l < m; l++) {
        int kept = (int)((r >> l) & 1);
        t->u[i][l] = kept ? -INFINITY : si[l];
        t->v[i][l] = kept ? -si[l] : -INFINITY;
    }
}

NMS_INLINE float maxplus(const float *a, const float *b, int m) {
    float r = -INFINITY;
#pragma omp simd reduction(max : r)
    for (int l = 0; l < m; l++) {
        float x = a[l] + b[l];
        r = x > r ? x : r; /* not fmaxf: that is a libm call without -ffinite-math-only */
    }
    return r;
}

NMS_INLINE void pair_gain(tile_t *t, int i, int k) {
    t->w[k][i] = maxplus(t->u[i], t->v[k], t->m);
    t->w[i][k] = maxplus(t->u[k], t->v[i], t->m);
}

NMS_INLINE int arg_gain(const tile_t *t, int k, int i) {
    int m = t->m, best = -1;
    const float *si = t->s + i * m, *sk = t->s + k * m;
    uint64_t ki = t->row[k] & ~t->row[i];
    float bv = -INFINITY;
    for (int l = 0; l < m; l++)
        if (((ki >> l) & 1) && si[l] - sk[l] > bv) { bv = si[l] - sk[l]; best = l; }
    return best;
}

NMS_INLINE void update_rows(tile_t *t, const int *rows, int nr) {
    uint64_t done = 0;
    for (int a = 0; a < nr; a++) {
        int i = rows[a];
        for (int k = 0; k < t->m; k++)
            if (k != i && !((done >> k) & 1)) pair_gain(t, i, k);
        done |= 1ull << i;
    }
}

/* Apply the cycle cyc[0] -> cyc[1] -> ... -> cyc[len-1] -> cyc[0] (a column moves along each edge)
 * if it gains more than the tolerance; columns are chosen on the masks before the move. */
NMS_INLINE int apply_cycle(tile_t *t, const int *cyc, int len) {
    int cols[MAXM];
    float gain = 0.0f;
    for (int e = 0; e < len; e++) {
        int k = cyc[e], i = cyc[(e + 1) % len];
        cols[e] = arg_gain(t, k, i);
        if (cols[e] < 0) return 0;
        gain += t->s[i * t->m + cols[e]] - t->s[k * t->m + cols[e]];
    }
    if (!(gain > t->tol)) return 0;
    for (int e = 0; e < len; e++) {
        int k = cyc[e], i = cyc[(e + 1) % len], l = cols[e];
        t->row[k] &= ~(1ull << l); t->row[i] |= 1ull << l;
        t->col[l] &= ~(1ull << k); t->col[l] |= 1ull << i;
        t->u[k][l] = t->s[k * t->m + l]; t->v[k][l] = -INFINITY;   /* k no longer keeps l */
        t->u[i][l] = -INFINITY; t->v[i][l] = -t->s[i * t->m + l]; /* i now keeps l */
    }
    update_rows(t, cyc, len);
    return 1;
}

NMS_INLINE int best_two_cycle(tile_t *t, int *cyc) {
    float bv = t->tol;
    int found = 0;
    for (int i = 0; i < t->m; i++)
        for (int k = i + 1; k < t->m; k++) {
            float g = t->w[k][i] + t->w[i][k];
            if (g > bv) { bv = g; cyc[0] = k; cyc[1] = i; found = 1; }
        }
    return found;
}

/* A cycle of the predecessor graph par (one parent per node), in forward edge order, or 0. */
NMS_INLINE int parent_cycle(const int *par, int m, int *cyc) {
    int stamp[MAXM];
    for (int i = 0; i < m; i++) stamp[i] = -1;
    for (int s = 0; s < m; s++) {
        int x = s;
        while (x >= 0 && stamp[x] < 0) { stamp[x] = s; x = par[x]; }
        if (x < 0 || stamp[x] != s) continue;
        int len = 0, y = x, rev[MAXM];
        do { rev[len++] = y; y = par[y]; } while (y != x);
        for (int e = 0; e < len; e++) cyc[e] = rev[len - 1 - e]; /* par[i] = k is the edge k -> i */
        return len;
    }
    return 0;
}

/* Bellman-Ford (longest walks from a virtual source, Jacobi rounds) on the row graph. A cycle that
 * forms in the predecessor graph is returned at once (in practice long before round M); if values
 * still improve after M rounds a positive cycle must exist and par holds one. apply_cycle re-checks
 * the gain. The inner loop runs over targets i, so it vectorises without horizontal reductions. */
NMS_INLINE int find_cycle(tile_t *t, int *cyc, int early, int rounds) {
    int m = t->m, par[MAXM];
    float d[MAXM], bv[MAXM];
    for (int i = 0; i < m; i++) { d[i] = 0.0f; par[i] = -1; t->w[i][i] = -INFINITY; }
    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < m; i++) bv[i] = -INFINITY;
        for (int k = 0; k < m; k++) {
            const float *wk = t->w[k];
            float dk = d[k];
#pragma omp simd
            for (int i = 0; i < m; i++) {
                float x = dk + wk[i];
                bv[i] = x > bv[i] ? x : bv[i];
            }
        }
        int changed = 0;
        for (int i = 0; i < m; i++)
            if (bv[i] > d[i] + t->tol) { /* the argmax only where the value improves */
                int k = 0;
                while (!(d[k] + t->w[k][i] == bv[i])) k++;
                par[i] = k; changed = 1;
            }
        for (int i = 0; i < m; i++) d[i] = bv[i] > d[i] + t->tol ? bv[i] : d[i];
        if (!changed) return 0;
        if (early || round >= m - 1) {
            int len = parent_cycle(par, m, cyc);
            if (len) return len;
        }
    }
    return 0;
}

NMS_CLONES static void solve_tile(tile_t *t, int mode) {
    int m = t->m, n = t->n;
    memset(t->row, 0, sizeof(uint64_t) * (size_t)m);
    memset(t->col, 0, sizeof(uint64_t) * (size_t)m);
    memset(t->rc, 0, sizeof(int) * (size_t)m);
    memset(t->cc, 0, sizeof(int) * (size_t)m);
    int kept = greedy(t);
    if (mode == 0) return;
    while (kept < n * m && augment(t)) kept++;
    float mx = 0.0f;
    for (int q = 0; q < m * m; q++) mx = fabsf(t->s[q]) > mx ? fabsf(t->s[q]) : mx;
    t->tol = 1e-6f * mx + 1e-30f;
    for (int i = 0; i < m; i++) row_uv(t, i);
    for (int i = 0; i < m; i++)
        for (int k = i + 1; k < m; k++) pair_gain(t, i, k);
    int cyc[MAXM], guard = 64 * m * m;
    while (guard-- > 0) {
        if (best_two_cycle(t, cyc) && apply_cycle(t, cyc, 2)) continue;
        if (mode < 2) break;
        int len = find_cycle(t, cyc, 1, m + 1);
        if (len && apply_cycle(t, cyc, len)) continue;
        if (!len) break;
        /* an early predecessor cycle did not gain: certify with the full M rounds */
        len = find_cycle(t, cyc, 0, m + 1);
        if (!len || !apply_cycle(t, cyc, len)) break;
    }
}

/* scores: rows x cols float32 (row stride ld), rows and cols multiples of m; mask: uint8, same
 * layout (stride ld_out). mode 0 greedy, 1 greedy + completion + 2x2 swaps, 2 optimal.
 * Returns 0 on success, -1 on bad arguments. */
int nms_transposable(const float *scores, int64_t rows, int64_t cols, int64_t ld, uint8_t *mask, int64_t ld_out,
                     int n, int m, int mode, int threads) {
    if (m < 1 || m > MAXM || n < 0 || n > m || rows % m || cols % m || mode < 0 || mode > 2) return -1;
    int64_t tr = rows / m, tc = cols / m, nt = tr * tc;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        tile_t t;
        t.m = m; t.n = n;
#pragma omp for schedule(dynamic, 64)
        for (int64_t q = 0; q < nt; q++) {
            int64_t r0 = (q / tc) * m, c0 = (q % tc) * m;
            for (int i = 0; i < m; i++) memcpy(t.s + i * m, scores + (r0 + i) * ld + c0, sizeof(float) * (size_t)m);
            solve_tile(&t, mode);
            for (int i = 0; i < m; i++) {
                uint8_t *o = mask + (r0 + i) * ld_out + c0;
                for (int j = 0; j < m; j++) o[j] = (uint8_t)((t.row[i] >> j) & 1);
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Channel permutations: random stripe pairing (a stripe = one group of M columns, M <= 4).
 * Each round pairs all stripes at random; for every pair, every way to split its 2M columns into two
 * groups of M (35 for 2:4) is scored over all rows and the best is applied (pairs are disjoint, so
 * they run in parallel and the result does not depend on the thread count). xt is (cols, rows):
 * one contiguous row vector per column, permuted in place together with perm.
 * ------------------------------------------------------------------------------------------------ */

static inline uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline float top2of4(float a, float b, float c, float d) {
    float m1 = a > b ? a : b, n1 = a > b ? b : a, m2 = c > d ? c : d, n2 = c > d ? d : c;
    float hi = m1 > m2 ? m1 : m2, lo = m1 > m2 ? m2 : m1, nn = n1 > n2 ? n1 : n2;
    return hi + (lo > nn ? lo : nn);
}

/* Sum of the n largest of m <= 4 values (a sorting network). */
static inline float topn4(float a, float b, float c, float d, int n, int m) {
    float v[4] = {a, b, c, d};
    for (int i = m; i < 4; i++) v[i] = -INFINITY;
    /* 4-input sorting network, descending */
#define CX(i, j) { float hi_ = v[i] > v[j] ? v[i] : v[j], lo_ = v[i] > v[j] ? v[j] : v[i]; v[i] = hi_; v[j] = lo_; }
    CX(0, 1) CX(2, 3) CX(0, 2) CX(1, 3) CX(1, 2)
#undef CX
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += v[i];
    return s;
}

/* Scores of every split of the 2m columns c[0..2m) (split s: groups sp[s][0..m) and sp[s][m..2m)),
 * summed over all rows. Rows go in blocks that stay in L1 while all splits are scored; float sums
 * per block, double across blocks. */
NMS_CLONES static void split_scores(const float *const *c, const int (*sp)[8], int nsplit, int n, int m,
                                    int64_t rows, double *out) {
    for (int s = 0; s < nsplit; s++) out[s] = 0.0;
    for (int64_t r0 = 0; r0 < rows; r0 += 256) {
        int64_t r1 = r0 + 256 < rows ? r0 + 256 : rows;
        for (int s = 0; s < nsplit; s++) {
            const int *g1 = sp[s], *g2 = sp[s] + m;
            const float *a = c[g1[0]], *b = c[g1[m > 1 ? 1 : 0]], *cc = c[g1[m > 2 ? 2 : 0]], *d = c[g1[m > 3 ? 3 : 0]];
            const float *e = c[g2[0]], *f = c[g2[m > 1 ? 1 : 0]], *g = c[g2[m > 2 ? 2 : 0]], *h = c[g2[m > 3 ? 3 : 0]];
            float acc = 0.0f;
            if (n == 2 && m == 4) { /* the common case, branch-free so it vectorises */
#pragma omp simd reduction(+ : acc)
                for (int64_t r = r0; r < r1; r++)
                    acc += top2of4(a[r], b[r], cc[r], d[r]) + top2of4(e[r], f[r], g[r], h[r]);
            } else {
                for (int64_t r = r0; r < r1; r++)
                    acc += topn4(a[r], b[r], cc[r], d[r], n, m) + topn4(e[r], f[r], g[r], h[r], n, m);
            }
            out[s] += acc;
        }
    }
}

int nms_stripe_pairs(float *xt, int64_t cols, int64_t rows, int n, int m, int64_t *perm, double seconds,
                     uint64_t seed, int max_stale, int threads, int64_t *rounds_out) {
    if (m < 1 || m > 4 || n < 1 || n > m || cols % m || cols / m < 2 || rows < 1) return -1;
    int64_t stripes = cols / m, npairs = stripes / 2;
    /* canonical splits: subsets of size m of {0..2m-1} that contain 0 (the other group is the rest) */
    int splits[35][8], nsplit = 0;
    for (int mask = 0; mask < (1 << (2 * m)); mask++) {
        if (!(mask & 1) || __builtin_popcount((unsigned)mask) != m) continue;
        int p = 0, q = m;
        for (int j = 0; j < 2 * m; j++) {
            if ((mask >> j) & 1) splits[nsplit][p++] = j; else splits[nsplit][q++] = j;
        }
        nsplit++;
    }
    int ident = 0; /* the split that keeps the current groups: {0..m-1} */
    for (int s = 0; s < nsplit; s++) {
        int ok = 1;
        for (int j = 0; j < m; j++) ok &= splits[s][j] == j;
        if (ok) { ident = s; break; }
    }
    int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)stripes);
    float *tmp = (float *)malloc(sizeof(float) * (size_t)rows * 8 * (size_t)(threads > 0 ? threads : 1));
    if (!order || !tmp) { free(order); free(tmp); return -2; }
    uint64_t state = seed;
    double start = omp_get_wtime();
    int stale = 0;
    int64_t rounds = 0;
    if (threads < 1 || npairs * rows < ((int64_t)1 << 20)) threads = 1; /* small rounds: wake-ups cost more */
    while (omp_get_wtime() - start < seconds && stale < max_stale) {
        for (int64_t i = 0; i < stripes; i++) order[i] = i;
        for (int64_t i = stripes - 1; i > 0; i--) { /* Fisher-Yates */
            int64_t j = (int64_t)(splitmix64(&state) % (uint64_t)(i + 1));
            int64_t t = order[i]; order[i] = order[j]; order[j] = t;
        }
        int64_t improved = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) reduction(+ : improved)
        for (int64_t p = 0; p < npairs; p++) {
            int64_t s1 = order[2 * p], s2 = order[2 * p + 1];
            const float *c[8];
            int64_t colid[8] = {0};
            for (int j = 0; j < m; j++) { colid[j] = s1 * m + j; colid[m + j] = s2 * m + j; }
            for (int j = 0; j < 2 * m; j++) c[j] = xt + colid[j] * rows;
            double sc[35];
            split_scores(c, (const int (*)[8])splits, nsplit, n, m, rows, sc);
            double base = sc[ident], best = base;
            int bs = ident;
            for (int s = 0; s < nsplit; s++)
                if (sc[s] > best) { best = sc[s]; bs = s; }
            if (bs == ident || !(best - base > 1e-6 * (base > 0 ? base : -base) / rows + 1e-12)) continue;
            /* move: new column slot j takes old column splits[bs][j] */
            float *t = tmp + (size_t)omp_get_thread_num() * 8 * (size_t)rows;
            int64_t pid[8];
            for (int j = 0; j < 2 * m; j++) {
                memcpy(t + (size_t)j * rows, c[j], sizeof(float) * (size_t)rows);
                pid[j] = perm[colid[j]];
            }
            for (int j = 0; j < 2 * m; j++) {
                int src = splits[bs][j];
                memcpy(xt + colid[j] * rows, t + (size_t)src * rows, sizeof(float) * (size_t)rows);
                perm[colid[j]] = pid[src];
            }
            improved++;
        }
        rounds++;
        stale = improved ? 0 : stale + 1;
    }
    free(order);
    free(tmp);
    if (rounds_out) *rounds_out = rounds;
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Exhaustive stripe-group search (small matrices): every set of k in {2, 3} stripes is scored for every
 * way to redistribute its k*M columns into k groups (35 splits for two 2:4 stripes, 5,775 for three).
 * A group's score is additive over its M-column subsets, so each set costs C(kM, M) subset sums over the
 * rows (70 or 495 for M = 4) plus a table lookup per split. Best non-overlapping improvements are
 * applied per sweep (largest gain first); sweeps repeat until none is left or time runs out.
 * ------------------------------------------------------------------------------------------------ */

typedef struct {
    int k, m, nsub, nsplit, ident;
    uint16_t sub[495];        /* subsets of {0..kM-1} of size M, as bitmasks */
    int16_t split[5775][3];   /* each split: k subset ids */
} groups_t;

static void groups_init(groups_t *g, int k, int m) {
    int w = k * m, id_of[4096];
    g->k = k; g->m = m; g->nsub = 0; g->nsplit = 0; g->ident = 0;
    for (int mask = 0; mask < (1 << w); mask++) {
        id_of[mask] = -1;
        if (__builtin_popcount((unsigned)mask) == m) { id_of[mask] = g->nsub; g->sub[g->nsub++] = (uint16_t)mask; }
    }
    /* canonical partitions: each group contains the lowest element not yet used */
    int full = (1 << w) - 1;
    for (int a = 0; a < g->nsub; a++) {
        int ma = g->sub[a];
        if (!(ma & 1)) continue;
        if (k == 2) {
            int mb = full & ~ma;
            g->split[g->nsplit][0] = (int16_t)a; g->split[g->nsplit][1] = (int16_t)id_of[mb];
            g->nsplit++;
            continue;
        }
        int rest = full & ~ma, low = rest & -rest;
        for (int b = 0; b < g->nsub; b++) {
            int mb = g->sub[b];
            if ((mb & ~rest) || !(mb & low)) continue;
            int mc = rest & ~mb;
            g->split[g->nsplit][0] = (int16_t)a; g->split[g->nsplit][1] = (int16_t)b;
            g->split[g->nsplit][2] = (int16_t)id_of[mc];
            g->nsplit++;
        }
    }
    int cur = 0; /* the split that keeps the current stripes: {0..m-1}, {m..2m-1}, ... */
    for (int s = 0; s < g->nsplit; s++) {
        int ok = 1;
        for (int q = 0; q < k; q++) ok &= g->sub[g->split[s][q]] == (((1 << m) - 1) << (q * m));
        if (ok) { cur = s; break; }
    }
    g->ident = cur;
}

/* Totals over all rows of the top-n of every subset of the set's columns c[0..kM). */
NMS_CLONES static void subset_totals(const float *const *c, const groups_t *g, int n, int64_t rows, double *tot) {
    int m = g->m;
    for (int s = 0; s < g->nsub; s++) tot[s] = 0.0;
    for (int64_t r0 = 0; r0 < rows; r0 += 256) {
        int64_t r1 = r0 + 256 < rows ? r0 + 256 : rows;
        for (int s = 0; s < g->nsub; s++) {
            int idx[4] = {0, 0, 0, 0}, q = 0;
            for (int j = 0; j < g->k * m; j++) if ((g->sub[s] >> j) & 1) idx[q++] = j;
            for (; q < 4; q++) idx[q] = idx[0];
            const float *a = c[idx[0]], *b = c[idx[1]], *cc = c[idx[2]], *d = c[idx[3]];
            float acc = 0.0f;
            if (n == 2 && m == 4) {
#pragma omp simd reduction(+ : acc)
                for (int64_t r = r0; r < r1; r++) acc += top2of4(a[r], b[r], cc[r], d[r]);
            } else {
                for (int64_t r = r0; r < r1; r++) acc += topn4(a[r], b[r], cc[r], d[r], n, m);
            }
            tot[s] += acc;
        }
    }
}

static int cmp_gain_desc(const void *pa, const void *pb) {
    const double *a = (const double *)pa, *b = (const double *)pb; /* {gain, index} pairs */
    if (a[0] != b[0]) return a[0] < b[0] ? 1 : -1;
    return a[1] < b[1] ? -1 : (a[1] > b[1]);
}

int nms_stripe_converge(float *xt, int64_t cols, int64_t rows, int n, int m, int64_t *perm, int k, double seconds,
                        int threads, int64_t *moves_out) {
    if (m < 1 || m > 4 || n < 1 || n > m || k < 2 || k > 3 || cols % m || rows < 1) return -1;
    int64_t stripes = cols / m;
    if (stripes < k) { if (moves_out) *moves_out = 0; return 0; }
    int64_t ng = k == 2 ? stripes * (stripes - 1) / 2 : stripes * (stripes - 1) * (stripes - 2) / 6;
    if (ng > 50000000) return -3;
    groups_t *g = (groups_t *)malloc(sizeof(groups_t));
    int32_t *sets = (int32_t *)malloc(sizeof(int32_t) * 3 * (size_t)ng);
    double *cand = (double *)malloc(sizeof(double) * 2 * (size_t)ng);
    int *bestsplit = (int *)malloc(sizeof(int) * (size_t)ng);
    uint8_t *used = (uint8_t *)malloc((size_t)stripes);
    float *tmp = (float *)malloc(sizeof(float) * 12 * (size_t)rows);
    if (!g || !sets || !cand || !bestsplit || !used || !tmp) {
        free(g); free(sets); free(cand); free(bestsplit); free(used); free(tmp);
        return -2;
    }
    groups_init(g, k, m);
    int64_t q = 0;
    for (int64_t a = 0; a < stripes; a++)
        for (int64_t b = a + 1; b < stripes; b++) {
            if (k == 2) { sets[3 * q] = (int32_t)a; sets[3 * q + 1] = (int32_t)b; q++; continue; }
            for (int64_t c = b + 1; c < stripes; c++) {
                sets[3 * q] = (int32_t)a; sets[3 * q + 1] = (int32_t)b; sets[3 * q + 2] = (int32_t)c; q++;
            }
        }
    double start = omp_get_wtime();
    int64_t moves = 0;
    if (threads < 1 || ng * rows < ((int64_t)1 << 22)) threads = 1; /* small sweeps: thread wake-ups cost more */
    while (omp_get_wtime() - start < seconds) {
        int64_t ncand = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
        for (int64_t i = 0; i < ng; i++) {
            const float *c[12];
            double tot[495];
            for (int s = 0; s < k; s++)
                for (int j = 0; j < m; j++) c[s * m + j] = xt + ((int64_t)sets[3 * i + s] * m + j) * rows;
            subset_totals(c, g, n, rows, tot);
            double base = 0.0, best = -INFINITY;
            int bs = g->ident;
            for (int s = 0; s < k; s++) base += tot[g->split[g->ident][s]];
            for (int sp = 0; sp < g->nsplit; sp++) {
                double v = tot[g->split[sp][0]] + tot[g->split[sp][1]] + (k == 3 ? tot[g->split[sp][2]] : 0.0);
                if (v > best) { best = v; bs = sp; }
            }
            bestsplit[i] = bs;
            /* float sums per row block: ignore gains at the rounding level (they could cycle) */
            cand[2 * i] = best - base > 1e-6 * (base > 0 ? base : -base) + 1e-12 ? best - base : 0.0;
        }
        for (int64_t i = 0; i < ng; i++)
            if (cand[2 * i] > 0.0) { cand[2 * ncand] = cand[2 * i]; cand[2 * ncand + 1] = (double)i; ncand++; }
        if (!ncand) break;
        qsort(cand, (size_t)ncand, 2 * sizeof(double), cmp_gain_desc);
        memset(used, 0, (size_t)stripes);
        for (int64_t t = 0; t < ncand; t++) {
            int64_t i = (int64_t)cand[2 * t + 1];
            int free_ = 1;
            for (int s = 0; s < k; s++) free_ &= !used[sets[3 * i + s]];
            if (!free_) continue;
            int64_t colid[12], pid[12];
            for (int s = 0; s < k; s++) {
                used[sets[3 * i + s]] = 1;
                for (int j = 0; j < m; j++) colid[s * m + j] = (int64_t)sets[3 * i + s] * m + j;
            }
            for (int j = 0; j < k * m; j++) {
                memcpy(tmp + (size_t)j * rows, xt + colid[j] * rows, sizeof(float) * (size_t)rows);
                pid[j] = perm[colid[j]];
            }
            int slot = 0; /* new group s takes the old columns of subset split[bs][s], in order */
            for (int s = 0; s < k; s++) {
                int mask = g->sub[g->split[bestsplit[i]][s]];
                for (int j = 0; j < k * m; j++)
                    if ((mask >> j) & 1) {
                        memcpy(xt + colid[slot] * rows, tmp + (size_t)j * rows, sizeof(float) * (size_t)rows);
                        perm[colid[slot]] = pid[j];
                        slot++;
                    }
            }
            moves++;
        }
    }
    free(g); free(sets); free(cand); free(bestsplit); free(used); free(tmp);
    if (moves_out) *moves_out = moves;
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Column reassignment by linear assignment (large matrices). Take one column out of every stripe (a
 * random position per stripe); each stripe keeps a "core" of M-1 columns. Putting column x back into
 * core b keeps, per row, topN(core) + max(0, x - t_b) with t_b the N-th largest core value (N < M),
 * so the score of an assignment of the taken-out columns to the cores is a sum of independent terms
 * G[a][b] = sum_r max(x_a[r], t_b[r]) (+ constants). The best reassignment of all columns at once is
 * a linear assignment problem (S x S for S stripes), solved exactly (shortest augmenting paths with
 * potentials); the current layout is one feasible assignment, so a round never loses score. One
 * round moves columns along arbitrary long exchange cycles, which stripe-pair moves cannot.
 * ------------------------------------------------------------------------------------------------ */

#define NMS_ASSIGN_MAX_M 32 /* column reassignment: groups of up to this many columns */

/* N-th largest (1-based) of k <= 3 values, per row. */
static inline float nth_of3(float a, float b, float c, int k, int n) {
    if (k == 1) return a;
    float hi = a > b ? a : b, lo = a > b ? b : a;
    if (k == 2) return n == 1 ? hi : lo;
    float top = hi > c ? hi : c, mid = hi > c ? (lo > c ? lo : c) : hi, bot = lo < c ? lo : c;
    return n == 1 ? top : (n == 2 ? mid : bot);
}

/* out[r] = the n-th largest of the k < NMS_ASSIGN_MAX_M core values c[0..k)[r] of row r (the median
 * for 2:4). k <= 3 uses a few compares; larger cores (M = 8, 16, 32) keep the n largest seen so far
 * in a small descending list. */
NMS_CLONES static void core_threshold(const float *const *c, int64_t len, int k, int n, float *out) {
    if (k == 3 && n == 2) {
        const float *c0 = c[0], *c1 = c[1], *c2 = c[2];
        for (int64_t r = 0; r < len; r++) {
            float a = c0[r], b = c1[r], d = c2[r], hi = a > b ? a : b, lo = a > b ? b : a;
            float m2 = hi < d ? hi : d;
            out[r] = lo > m2 ? lo : m2;
        }
        return;
    }
    if (k <= 3) {
        for (int64_t r = 0; r < len; r++) out[r] = nth_of3(c[0][r], c[k > 1][r], c[k > 2 ? 2 : 0][r], k, n);
        return;
    }
    for (int64_t r = 0; r < len; r++) {
        float top[NMS_ASSIGN_MAX_M];
        int have = 0;
        for (int j = 0; j < k; j++) {
            float v = c[j][r];
            if (have == n && v <= top[n - 1]) continue;
            int i = have < n ? have++ : n - 1; /* insert v, dropping the smallest when the list is full */
            while (i > 0 && top[i - 1] < v) { top[i] = top[i - 1]; i--; }
            top[i] = v;
        }
        out[r] = top[n - 1];
    }
}

/* G[a][b] += sum over rows r0..r1 of max(x_a, t_b), for a in [a0, a1), all b; 4 x 4 register tiles. */
NMS_CLONES static void assign_gain_block(const float *x, const float *t, int64_t ld, int64_t s, int64_t a0, int64_t a1,
                                         int64_t r0, int64_t r1, double *g) {
    const int64_t bc = 32; /* cores per chunk: 32 x 256 rows stay in L1 */
    for (int64_t b0 = 0; b0 < s; b0 += bc) {
        int64_t b1 = b0 + bc < s ? b0 + bc : s;
        for (int64_t a = a0; a < a1; a += 4) {
            const float *x0 = x + a * ld, *x1 = x + (a + 1 < s ? a + 1 : a) * ld;
            const float *x2 = x + (a + 2 < s ? a + 2 : a) * ld, *x3 = x + (a + 3 < s ? a + 3 : a) * ld;
            for (int64_t b = b0; b < b1; b += 4) {
                const float *t0 = t + b * ld, *t1 = t + (b + 1 < s ? b + 1 : b) * ld;
                const float *t2 = t + (b + 2 < s ? b + 2 : b) * ld, *t3 = t + (b + 3 < s ? b + 3 : b) * ld;
                float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
                float s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
                for (int64_t r = r0; r < r1; r++) {
                    float xa = x0[r], xb = x1[r], xc = x2[r], xd = x3[r];
                    float ta = t0[r], tb = t1[r], tc = t2[r], td = t3[r];
#define MX(p, q) ((p) > (q) ? (p) : (q))
                    s00 += MX(xa, ta); s01 += MX(xa, tb); s02 += MX(xa, tc); s03 += MX(xa, td);
                    s10 += MX(xb, ta); s11 += MX(xb, tb); s12 += MX(xb, tc); s13 += MX(xb, td);
                    s20 += MX(xc, ta); s21 += MX(xc, tb); s22 += MX(xc, tc); s23 += MX(xc, td);
                    s30 += MX(xd, ta); s31 += MX(xd, tb); s32 += MX(xd, tc); s33 += MX(xd, td);
#undef MX
                }
                float acc[4][4] = {
                    {s00, s01, s02, s03}, {s10, s11, s12, s13}, {s20, s21, s22, s23}, {s30, s31, s32, s33}};
                for (int i = 0; i < 4 && a + i < s; i++)
                    for (int j = 0; j < 4 && b + j < s; j++) g[(a + i) * s + b + j] += (double)acc[i][j];
            }
        }
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define NMS_HAVE_AVX512 1
/* AVX-512 version with the cores along the vector lanes (tT is rows x sp, sp = s padded to 64 with
 * -inf): x_a[r] is broadcast and 4 taken-out columns x 64 cores accumulate in 16 registers over a
 * block of rows, so no horizontal sums are needed. Same sums as the portable version, other order. */
__attribute__((target("avx512f"))) static void assign_gain_avx512(const float *x, const float *tT, int64_t rows,
                                                                  int64_t s, int64_t sp, int64_t a0, int64_t a1,
                                                                  int64_t r0, int64_t r1, double *g) {
    for (int64_t b0 = 0; b0 < sp; b0 += 64) {
        for (int64_t a = a0; a < a1; a += 4) {
            const float *xs[4];
            for (int i = 0; i < 4; i++) xs[i] = x + (a + i < s ? a + i : a) * rows;
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
            for (int64_t r = r0; r < r1; r++) {
                const float *tr = tT + r * sp + b0;
                __m512 t0 = _mm512_loadu_ps(tr), t1 = _mm512_loadu_ps(tr + 16);
                __m512 t2 = _mm512_loadu_ps(tr + 32), t3 = _mm512_loadu_ps(tr + 48);
                for (int i = 0; i < 4; i++) {
                    __m512 xi = _mm512_set1_ps(xs[i][r]);
                    acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_max_ps(xi, t0));
                    acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_max_ps(xi, t1));
                    acc[i][2] = _mm512_add_ps(acc[i][2], _mm512_max_ps(xi, t2));
                    acc[i][3] = _mm512_add_ps(acc[i][3], _mm512_max_ps(xi, t3));
                }
            }
            for (int i = 0; i < 4 && a + i < s; i++) {
                double *gi = g + (a + i) * s;
                for (int j = 0; j < 4; j++) {
                    float v[16];
                    _mm512_storeu_ps(v, acc[i][j]);
                    for (int l = 0; l < 16; l++) {
                        int64_t b = b0 + 16 * j + l;
                        if (b < s) gi[b] += (double)v[l];
                    }
                }
            }
        }
    }
}
#endif

/* Maximum-weight perfect assignment on the n x n matrix g (row a -> column col_of[a]), as shortest
 * augmenting paths with potentials on costs -g (Hungarian / Jonker-Volgenant, O(n^3) worst case, far
 * less in practice). Rows start on a tight greedy matching after column and row reduction, so only the
 * rest need a search. Returns 0, or 1 if the deadline passed first (col_of is then untouched). */
static int lap_max(const double *g, int64_t n, int64_t *col_of, double deadline) {
    double *u = (double *)malloc(sizeof(double) * (size_t)n), *v = (double *)malloc(sizeof(double) * (size_t)n);
    double *spc = (double *)malloc(sizeof(double) * (size_t)n);
    size_t ni = sizeof(int64_t) * (size_t)n;
    int64_t *row4col = (int64_t *)malloc(ni), *col4row = (int64_t *)malloc(ni), *path = (int64_t *)malloc(ni);
    int64_t *remaining = (int64_t *)malloc(ni), *sr = (int64_t *)malloc(ni), *sc = (int64_t *)malloc(ni);
    int rc = 0;
    if (!u || !v || !spc || !row4col || !col4row || !path || !remaining || !sr || !sc) { rc = -2; goto out; }
    for (int64_t j = 0; j < n; j++) { v[j] = INFINITY; row4col[j] = -1; }
    for (int64_t i = 0; i < n; i++) { /* column reduction: v[j] = min_i cost(i, j) */
        const double *gi = g + i * n;
        for (int64_t j = 0; j < n; j++) v[j] = -gi[j] < v[j] ? -gi[j] : v[j];
    }
    for (int64_t i = 0; i < n; i++) { /* row reduction; keep a tight free column if there is one */
        const double *gi = g + i * n;
        double mn = INFINITY;
        int64_t arg = -1;
        for (int64_t j = 0; j < n; j++) {
            double c = -gi[j] - v[j];
            if (c < mn || (c == mn && row4col[arg] >= 0 && row4col[j] < 0)) { mn = c; arg = j; }
        }
        u[i] = mn;
        col4row[i] = -1;
        if (row4col[arg] < 0) { row4col[arg] = i; col4row[i] = arg; }
    }
    for (int64_t cur = 0; cur < n; cur++) {
        if (col4row[cur] >= 0) continue;
        if (omp_get_wtime() > deadline) { rc = 1; goto out; }
        /* Dijkstra from row cur over reduced costs (all >= 0); stops at the first free column */
        int64_t nrem = n, nsr = 0, nsc = 0, i = cur, sink = -1;
        double minval = 0.0;
        for (int64_t j = 0; j < n; j++) { remaining[j] = n - 1 - j; spc[j] = INFINITY; }
        while (sink < 0) {
            sr[nsr++] = i;
            const double *gi = g + i * n;
            double lowest = INFINITY, base = minval - u[i];
            int64_t idx = -1;
            for (int64_t it = 0; it < nrem; it++) {
                int64_t j = remaining[it];
                double r = base - gi[j] - v[j];
                if (r < spc[j]) { path[j] = i; spc[j] = r; }
                if (spc[j] < lowest || (spc[j] == lowest && row4col[j] < 0)) { lowest = spc[j]; idx = it; }
            }
            minval = lowest;
            int64_t j = remaining[idx];
            if (row4col[j] < 0) sink = j; else i = row4col[j];
            sc[nsc++] = j;
            remaining[idx] = remaining[--nrem];
        }
        u[cur] += minval;
        for (int64_t q = 0; q < nsr; q++) if (sr[q] != cur) u[sr[q]] += minval - spc[col4row[sr[q]]];
        for (int64_t q = 0; q < nsc; q++) v[sc[q]] -= minval - spc[sc[q]];
        for (int64_t j = sink;;) { /* augment along the path */
            int64_t r = path[j];
            row4col[j] = r;
            int64_t prev = col4row[r];
            col4row[r] = j;
            if (r == cur) break;
            j = prev;
        }
    }
    for (int64_t i = 0; i < n; i++) col_of[i] = col4row[i];
out:
    free(u); free(v); free(spc); free(row4col); free(col4row); free(path); free(remaining); free(sr); free(sc);
    return rc;
}

/* Rounds of column reassignment (see above) until `seconds` pass, `max_rounds` rounds ran or
 * `max_stale` rounds in a row moved nothing. With more than `block` stripes (<= 0: 1024), each round
 * splits the stripes at random into near-equal blocks of at most `block` and solves one assignment per
 * block (bounds the S x S matrix and the O(S^3) worst case). `noise` > 0 adds uniform noise of that
 * amplitude to every G entry before the assignment (an annealing step: the round may then lose score).
 * xt (cols, rows) and perm are permuted in place; moved_out gets the number of columns moved. */
int nms_stripe_assign(float *xt, int64_t cols, int64_t rows, int n, int m, int64_t *perm, double seconds,
                      uint64_t seed, double noise, int64_t block, int max_rounds, int max_stale, int threads,
                      int64_t *moved_out) {
    if (m < 2 || m > NMS_ASSIGN_MAX_M || n < 1 || n >= m || cols % m || cols / m < 2 || rows < 1) return -1;
    int64_t s = cols / m;
    int64_t nb = (s + (block > 0 ? block : 1024) - 1) / (block > 0 ? block : 1024);
    int64_t bmax = (s + nb - 1) / nb, sp = (bmax + 63) / 64 * 64;
    int wide = 0;
#ifdef NMS_HAVE_AVX512
    __builtin_cpu_init();
    /* NMKIT_SOLVERS_PORTABLE=1 forces the portable kernel (tests compare the two) */
    wide = __builtin_cpu_supports("avx512f") && !getenv("NMKIT_SOLVERS_PORTABLE");
#endif
    float *x = (float *)malloc(sizeof(float) * (size_t)bmax * (size_t)rows);
    float *t = (float *)malloc(sizeof(float) * (size_t)(wide ? sp : bmax) * (size_t)rows);
    double *g = (double *)malloc(sizeof(double) * (size_t)bmax * (size_t)bmax);
    size_t si = sizeof(int64_t) * (size_t)s;
    int64_t *col_of = (int64_t *)malloc(si), *pos = (int64_t *)malloc(si), *pid = (int64_t *)malloc(si);
    int64_t *ord = (int64_t *)malloc(si);
    if (!x || !t || !g || !col_of || !pos || !pid || !ord) {
        free(x); free(t); free(g); free(col_of); free(pos); free(pid); free(ord);
        return -2;
    }
    double start = omp_get_wtime(), deadline = start + seconds;
    uint64_t state = seed;
    int64_t moved = 0;
    int stale = 0, late = 0;
    if (threads < 1 || bmax * bmax * rows < ((int64_t)1 << 24)) threads = 1;
    const int64_t rb = 512, ab = wide ? 128 : 16; /* row block; taken-out columns per task */
    for (int64_t b = 0; b < s; b++) ord[b] = b;
    for (int round = 0; round < max_rounds && stale < max_stale && !late && omp_get_wtime() < deadline; round++) {
        for (int64_t b = 0; b < s; b++) pos[b] = (int64_t)(splitmix64(&state) % (uint64_t)m);
        if (nb > 1)
            for (int64_t i = s - 1; i > 0; i--) { /* Fisher-Yates: which stripes share a block */
                int64_t j = (int64_t)(splitmix64(&state) % (uint64_t)(i + 1)), tmp = ord[i];
                ord[i] = ord[j]; ord[j] = tmp;
            }
        int64_t here = 0;
        for (int64_t k = 0, k0 = 0; k < nb && !late; k++) {
            int64_t sb = s / nb + (k < s % nb), k1 = k0 + sb;
            const int64_t *st = ord + k0; /* the block's stripes; local index a is stripe st[a] */
            k0 = k1;
            /* x[a] = the column taken out of stripe st[a]; t = per row, the N-th largest of each core
             * (as (sb, rows) for the portable kernel, transposed to (rows, sp) for the AVX-512 one) */
#pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t a0 = 0; a0 < sb; a0 += 16) {
                float blk[16 * 64];
                int64_t a1 = a0 + 16 < sb ? a0 + 16 : sb;
                for (int64_t a = a0; a < a1; a++)
                    memcpy(x + a * rows, xt + (st[a] * m + pos[st[a]]) * rows, sizeof(float) * (size_t)rows);
                for (int64_t r0 = 0; r0 < rows; r0 += 64) {
                    int64_t r1 = r0 + 64 < rows ? r0 + 64 : rows;
                    for (int64_t a = a0; a < a1; a++) {
                        int64_t b = st[a];
                        const float *c[NMS_ASSIGN_MAX_M];
                        int q = 0;
                        for (int j = 0; j < m; j++)
                            if (j != pos[b]) c[q++] = xt + (b * m + j) * rows + r0;
                        core_threshold(c, r1 - r0, m - 1, n, wide ? blk + (a - a0) * 64 : t + a * rows + r0);
                    }
                    if (wide)
                        for (int64_t r = r0; r < r1; r++)
                            for (int64_t a = a0; a < a0 + 16; a++)
                                t[r * sp + a] = a < a1 ? blk[(a - a0) * 64 + r - r0] : -INFINITY;
                }
            }
            if (wide)
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t a = (sb + 15) / 16 * 16; a < sp; a++) t[r * sp + a] = -INFINITY;
            for (int64_t a = 0; a < sb; a++) pid[a] = perm[st[a] * m + pos[st[a]]];
            memset(g, 0, sizeof(double) * (size_t)sb * (size_t)sb);
            int64_t na = (sb + ab - 1) / ab;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
            for (int64_t q = 0; q < na; q++) { /* each task owns rows [a0, a1) of g */
                int64_t a0 = q * ab, a1 = a0 + ab < sb ? a0 + ab : sb;
                for (int64_t r0 = 0; r0 < rows; r0 += rb) {
                    int is_late;
#pragma omp atomic read
                    is_late = late;
                    if (is_late) break;
                    if (omp_get_wtime() > deadline) {
#pragma omp atomic write
                        late = 1;
                        break;
                    }
                    int64_t r1 = r0 + rb < rows ? r0 + rb : rows;
#ifdef NMS_HAVE_AVX512
                    if (wide) { assign_gain_avx512(x, t, rows, sb, sp, a0, a1, r0, r1, g); continue; }
#endif
                    for (int64_t c0 = r0; c0 < r1; c0 += 256)
                        assign_gain_block(x, t, rows, sb, a0, a1, c0, c0 + 256 < r1 ? c0 + 256 : r1, g);
                }
            }
            if (late) break;
            if (noise > 0)
                for (int64_t q = 0; q < sb * sb; q++)
                    g[q] += noise * ((double)(splitmix64(&state) >> 11) * 0x1.0p-53 - 0.5);
            if (lap_max(g, sb, col_of, deadline) != 0) { late = 1; break; }
            double before = 0.0, after = 0.0, mag = 0.0;
            for (int64_t a = 0; a < sb; a++) {
                before += g[a * sb + a];
                after += g[a * sb + col_of[a]];
                mag += fabs(g[a * sb + a]);
            }
            if (!(after - before > 1e-9 * mag + 1e-12)) continue;
            for (int64_t a = 0; a < sb; a++) { /* column a moves into core col_of[a], at that stripe's free slot */
                int64_t b = st[col_of[a]];
                if (col_of[a] == a) continue;
                memcpy(xt + (b * m + pos[b]) * rows, x + a * rows, sizeof(float) * (size_t)rows);
                perm[b * m + pos[b]] = pid[a];
                here++;
            }
        }
        moved += here;
        stale = here ? 0 : stale + 1;
    }
    free(x); free(t); free(g); free(col_of); free(pos); free(pid); free(ord);
    if (moved_out) *moved_out = moved;
    return 0;
}
