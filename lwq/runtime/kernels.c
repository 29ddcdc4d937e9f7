/* Kernels of lwq's packed layers on CPU: y = x W^T + b without a float weight.
 *
 * The layout is built by lwq/runtime/layout.py, which documents it; in short:
 * each row of the low grid is n_groups groups of n_blocks blocks of 32 columns,
 * a block of b-bit codes taking 4*b bytes:
 *   b = 2: byte j (0..7), bits 2k..2k+1 hold column 8k + j;
 *   b = 3: bytes 0..7 the low two bits as for b = 2, then bytes 8..11 the third
 *          bit, byte 8 + k bit j for column 8k + j;
 *   b = 4: byte j (0..15), bits 4k..4k+3 hold column 16k + j;
 *   b = 8: byte j holds column j.
 * So one vector load decodes eight or sixteen neighbouring columns with one
 * shift and one mask. A group's weight is s * (q - z) with a float16 scale s
 * and an integer zero z; the kernels compute s * (sum q x - z * sum x) per
 * group. Weights on the high grid are a list sorted by row and group with a
 * float16 scale per (row, high group): per group, one word per entry (column in
 * the group, code minus zero) and a count per group; for sparse layers, per
 * row, a column and a code minus zero per entry; for a float16 high grid, the
 * values. Their places in the low grid hold the low zero, so they add nothing
 * there. A layer with many high-impact weights keeps them instead as a second
 * grid in the same block layout (hi_grid), its zero everywhere else, and the
 * row is the sum of both grids' products.
 *
 * Built on first use by lwq/runtime/native.py (gcc -O3 -march=native -fopenmp)
 * and called through ctypes; every function has a pure-torch twin in
 * layout.py that the tests hold it equal to.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

#define BLOCK 32
#define MAXM 8 /* activation rows per pass of the matrix-vector kernel */
#define MAX_HI_GROUPS 1024
#define ROW_CHUNK 64 /* rows per unit of work of the matrix-vector kernel */
#define MAX_LAYERS 8 /* layers in one matrix-vector call */

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__F16C__)
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0) {
        f = (float)man * 5.9604644775390625e-8f; /* subnormal: man * 2^-24 */
        return sign ? -f : f;
    }
    if (exp == 31)
        bits = sign | 0x7f800000u | (man << 13);
    else
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* Eight lanes, written with GCC's vector extensions: the compiler maps them to
 * AVX2, AVX-512, NEON or plain scalars, whatever the machine has. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint8_t v8u8 __attribute__((vector_size(8)));

static inline v8f load8f(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v8i load8u8(const uint8_t *p) {
#if defined(__AVX2__) /* GCC 12 scalarises the generic widening below */
    return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8u8 v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, v8i);
#endif
}

static inline v8f to_float(v8i v) { return __builtin_convertvector(v, v8f); }

/* The 32 codes of one block as four vectors of eight floats (columns 8k..8k+7).
 * With scaled (2-bit only), vector k holds the codes times 4^k: a mask without
 * the shift, for the matrix-vector kernel, which multiplies them by x times
 * 4^-k (both scalings are powers of two, so the products are the same). */
static inline __attribute__((always_inline)) void decode_block(
    const int bits, const int scaled, const uint8_t *restrict p, v8f q[4]) {
    if (bits == 2 && scaled) {
        const v8i b = load8u8(p);
        for (int k = 0; k < 4; k++) q[k] = to_float(b & (3 << (2 * k)));
    } else if (bits == 2) {
        const v8i b = load8u8(p);
        for (int k = 0; k < 4; k++) q[k] = to_float((b >> (2 * k)) & 3);
    } else if (bits == 3) {
        const v8i b = load8u8(p);
        const v8i lanes = {0, 1, 2, 3, 4, 5, 6, 7};
        uint32_t word;
        memcpy(&word, p + 8, sizeof word);
        const v8u t = (v8u){} + word; /* the block's third bits, in every lane */
        for (int k = 0; k < 4; k++) {
            const v8i third = (v8i)(t >> (v8u)(lanes + 8 * k));
            q[k] = to_float(((b >> (2 * k)) & 3) | ((third & 1) << 2));
        }
    } else if (bits == 4) {
        const v8i b0 = load8u8(p), b1 = load8u8(p + 8);
        q[0] = to_float(b0 & 15);
        q[1] = to_float(b1 & 15);
        q[2] = to_float(b0 >> 4);
        q[3] = to_float(b1 >> 4);
    } else {
        for (int k = 0; k < 4; k++) q[k] = to_float(load8u8(p + 8 * k));
    }
}

static inline float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

typedef struct layer {
    int64_t n_out;       /* rows of W */
    int64_t n_in;        /* columns of W */
    int64_t bits;        /* low grid width: 2, 3, 4 or 8 */
    int64_t group;       /* low group length in columns (the last group may be shorter) */
    int64_t n_groups;    /* low groups per row */
    int64_t n_blocks;    /* 32-column blocks of a whole group */
    int64_t last_blocks; /* 32-column blocks of the last group */
    const uint8_t *codes;     /* (n_out, row_blocks * 4 * bits) */
    const uint16_t *scales;   /* (n_out, n_groups) float16 */
    const uint8_t *zeros;     /* (n_out, n_groups) */
    /* high grid; rowptr == NULL when the layer has none */
    const int32_t *rowptr;     /* (n_out + 1) first entry of each row */
    const uint16_t *hi_counts; /* (n_out, hi_n_groups) entries per (row, high group) */
    const void *hi_entries;    /* (n_hi) uint16, or uint32 when hi_wide */
    const uint16_t *hi_scales; /* (n_out, hi_n_groups) float16, integer grids */
    const float *hi_values;    /* (n_hi) float16 high grid, or NULL */
    const uint16_t *hi_cols;   /* (n_hi) a sparse layer's list per row: column of each entry, */
    const int8_t *hi_codes;    /* and its code - zero (hi_counts and hi_entries are NULL) */
    int64_t hi_group;
    int64_t hi_n_groups;
    int64_t hi_code_bits;      /* an entry: column in group << bits | code - zero + 2^(bits-1) */
    int64_t hi_wide;
    const struct layer *hi_grid; /* a dense high grid, or NULL: a layer of its own (no lists) */
} layer_t;

static inline int64_t row_blocks(const layer_t *L) {
    return (L->n_groups - 1) * L->n_blocks + L->last_blocks;
}

static inline int64_t group_blocks(const layer_t *L, int64_t g) {
    return g == L->n_groups - 1 ? L->last_blocks : L->n_blocks;
}

static inline uint32_t hi_entry(const layer_t *L, int64_t e) {
    return L->hi_wide ? ((const uint32_t *)L->hi_entries)[e] : ((const uint16_t *)L->hi_entries)[e];
}

/* Column and weight of entry e, in high group g of row r. */
static inline float hi_weight(const layer_t *L, int64_t r, int64_t g, int64_t e, int64_t *col) {
    const uint32_t v = hi_entry(L, e);
    const int cb = (int)L->hi_code_bits;
    *col = g * L->hi_group + (v >> cb);
    if (L->hi_values) return L->hi_values[e];
    const int32_t code = (int32_t)(v & ((1u << cb) - 1)) - (1 << (cb - 1));
    return (float)code * half_to_float(L->hi_scales[r * L->hi_n_groups + g]);
}

/* Weight of entry e of row r in a per-row list. */
static inline float hi_row_weight(const layer_t *L, int64_t r, int64_t e) {
    const int64_t g = r * L->hi_n_groups + L->hi_cols[e] / L->hi_group;
    return (float)L->hi_codes[e] * half_to_float(L->hi_scales[g]);
}

/* Position of column c in the padded activation layout: every group padded to
 * whole blocks (the identity when every group is a multiple of 32 columns). */
static inline int64_t padded_col(const layer_t *L, int64_t c) {
    const int64_t gp = L->n_blocks * BLOCK;
    if (gp == L->group) return c;
    return (c / L->group) * gp + c % L->group;
}

/* The kernels' bodies take the width (and for one sequence the batch) as
 * constants, and each specialisation is its own function: OpenMP outlines a
 * parallel loop before the compiler inlines, so the loops below only split
 * rows among threads and call the specialised function. */
typedef struct {
    const layer_t *L;
    const float *x;
    const float *x4; /* x scaled for 2-bit grids (grid_row), or NULL when none reads it */
    int64_t m, ldx;
    const float *xsum, *xsum_hi, *bias;
    float *y;
    int64_t ldy;
} call_t;

/* Adds row r of a grid times x to out[0..m): per group s * (sum q x - z sum x),
 * with sum x of each group in xsum[i * n_groups + g]. A 2-bit grid takes x with
 * columns 8k..8k+7 of every block times 4^-k (decode_block). */
static inline __attribute__((always_inline)) void grid_row(
    const int bits, const int64_t m, const layer_t *L, const float *restrict x, const int64_t ldx,
    const float *xsum, const int64_t r, float *out) {
    const int64_t block_bytes = 4 * bits;
    const int64_t row_bytes = row_blocks(L) * block_bytes;
    const int64_t gp = L->n_blocks * BLOCK;
    v8f vout[MAXM]; /* the groups' scaled sums, reduced once per row */
    for (int64_t i = 0; i < m; i++) vout[i] = (v8f){};
    const uint8_t *pr = L->codes + r * row_bytes;
    for (int64_t g = 0; g < L->n_groups; g++) {
        v8f acc[MAXM][4];
        for (int64_t i = 0; i < m; i++)
            for (int k = 0; k < 4; k++) acc[i][k] = (v8f){};
        const int64_t nb = group_blocks(L, g);
        for (int64_t b = 0; b < nb; b++) {
            v8f q[4];
            decode_block(bits, 1, pr + (g * L->n_blocks + b) * block_bytes, q);
            const float *xb = x + g * gp + b * BLOCK;
            for (int64_t i = 0; i < m; i++)
                for (int k = 0; k < 4; k++)
                    acc[i][k] += load8f(xb + i * ldx + 8 * k) * q[k];
        }
        const float s = half_to_float(L->scales[r * L->n_groups + g]);
        const float z = (float)L->zeros[r * L->n_groups + g];
        for (int64_t i = 0; i < m; i++) {
            vout[i] += ((acc[i][0] + acc[i][1]) + (acc[i][2] + acc[i][3])) * s;
            out[i] -= s * z * xsum[i * L->n_groups + g];
        }
    }
    for (int64_t i = 0; i < m; i++) out[i] += hsum(vout[i]);
}

static inline __attribute__((always_inline)) void matvec_impl(
    const int bits, const int64_t m, const call_t *C, int64_t r0, int64_t r1) {
    const layer_t *L = C->L;
    const float *restrict x = C->x;
    const int64_t ldx = C->ldx;
    const layer_t *G = L->hi_grid;
    /* the common case: an integer high grid in 16-bit entries, no padding */
    const int fast_hi = !L->hi_values && !L->hi_wide && row_blocks(L) * BLOCK == L->n_in;
    int shift = 0;
    while (shift < 30 && (1LL << shift) < L->hi_group) shift++;
    const int row_fast = row_blocks(L) * BLOCK == L->n_in && (1LL << shift) == L->hi_group &&
                         L->hi_n_groups <= MAX_HI_GROUPS;
    for (int64_t r = r0; r < r1; r++) {
        float out[MAXM];
        for (int64_t i = 0; i < m; i++) out[i] = C->bias ? C->bias[r] : 0.0f;
        grid_row(bits, m, L, bits == 2 ? C->x4 : x, ldx, C->xsum, r, out);
        if (G) switch (G->bits) { /* a dense high grid */
            case 2: grid_row(2, m, G, C->x4, ldx, C->xsum_hi, r, out); break;
            case 3: grid_row(3, m, G, x, ldx, C->xsum_hi, r, out); break;
            case 4: grid_row(4, m, G, x, ldx, C->xsum_hi, r, out); break;
            default: grid_row(8, m, G, x, ldx, C->xsum_hi, r, out); break;
        }
        if (L->hi_cols && L->rowptr[r] < L->rowptr[r + 1]) { /* a sparse layer's row list */
            const int64_t e0 = L->rowptr[r], e1 = L->rowptr[r + 1];
            if (m == 1 && row_fast) { /* scales from a table, four independent sums */
                float hs[MAX_HI_GROUPS];
                for (int64_t g = 0; g < L->hi_n_groups; g++)
                    hs[g] = half_to_float(L->hi_scales[r * L->hi_n_groups + g]);
                const uint16_t *hc = L->hi_cols;
                const int8_t *hq = L->hi_codes;
                float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                int64_t e = e0;
                for (; e + 4 <= e1; e += 4)
                    for (int u = 0; u < 4; u++)
                        p[u] += (float)hq[e + u] * hs[hc[e + u] >> shift] * x[hc[e + u]];
                for (; e < e1; e++) p[0] += (float)hq[e] * hs[hc[e] >> shift] * x[hc[e]];
                out[0] += (p[0] + p[1]) + (p[2] + p[3]);
            } else {
                for (int64_t e = e0; e < e1; e++) {
                    const float w = hi_row_weight(L, r, e);
                    const int64_t c = padded_col(L, L->hi_cols[e]);
                    for (int64_t i = 0; i < m; i++) out[i] += w * x[i * ldx + c];
                }
            }
        } else if (L->rowptr && L->rowptr[r] < L->rowptr[r + 1]) {
            int64_t e = L->rowptr[r];
            const uint16_t *counts = L->hi_counts + r * L->hi_n_groups;
            for (int64_t g = 0; g < L->hi_n_groups; g++) {
                const int64_t n = counts[g];
                if (n == 0) continue;
                const int64_t end = e + n;
                if (m == 1 && fast_hi) { /* sum (code - zero) x over the group, times its scale */
                    const uint16_t *ent = (const uint16_t *)L->hi_entries;
                    const float *xg = x + g * L->hi_group;
                    const int cb = (int)L->hi_code_bits;
                    const uint32_t mask = (1u << cb) - 1;
                    const int32_t off = 1 << (cb - 1);
                    float p0 = 0.0f, p1 = 0.0f;
#if defined(__AVX2__)
                    v8f acc = {};
                    for (; e + 8 <= end; e += 8) { /* eight entries: one gather of x */
                        const __m256i v = _mm256_cvtepu16_epi32(
                            _mm_loadu_si128((const __m128i *)(ent + e)));
                        const __m256 xv = _mm256_i32gather_ps(xg, _mm256_srli_epi32(v, cb), 4);
                        const __m256i q = _mm256_sub_epi32(
                            _mm256_and_si256(v, _mm256_set1_epi32((int)mask)),
                            _mm256_set1_epi32(off));
                        acc += (v8f)_mm256_cvtepi32_ps(q) * (v8f)xv;
                    }
                    if (n >= 8) p0 = hsum(acc);
#endif
                    for (; e + 2 <= end; e += 2) {
                        p0 += (float)((int32_t)(ent[e] & mask) - off) * xg[ent[e] >> cb];
                        p1 += (float)((int32_t)(ent[e + 1] & mask) - off) * xg[ent[e + 1] >> cb];
                    }
                    if (e < end) p0 += (float)((int32_t)(ent[e] & mask) - off) * xg[ent[e] >> cb];
                    e = end;
                    const float s = half_to_float(L->hi_scales[r * L->hi_n_groups + g]);
                    out[0] += s * (p0 + p1);
                } else {
                    for (; e < end; e++) {
                        int64_t col;
                        const float w = hi_weight(L, r, g, e, &col);
                        const int64_t c = padded_col(L, col);
                        for (int64_t i = 0; i < m; i++) out[i] += w * x[i * ldx + c];
                    }
                }
            }
        }
        for (int64_t i = 0; i < m; i++) C->y[i * C->ldy + r] = out[i];
    }
}

static inline __attribute__((always_inline)) void dequant_impl(
    const int bits, const layer_t *L, float *restrict w, int64_t ldw, int64_t r0, int64_t r1) {
    const int64_t block_bytes = 4 * bits;
    const int64_t row_bytes = row_blocks(L) * block_bytes;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *pr = L->codes + r * row_bytes;
        float *wr = w + r * ldw;
        for (int64_t g = 0; g < L->n_groups; g++) {
            const float s = half_to_float(L->scales[r * L->n_groups + g]);
            const float z = (float)L->zeros[r * L->n_groups + g];
            const int64_t c0 = g * L->group;
            int64_t len = L->n_in - c0 < L->group ? L->n_in - c0 : L->group;
            for (int64_t b = 0; len > 0; b++) {
                v8f q[4];
                decode_block(bits, 0, pr + (g * L->n_blocks + b) * block_bytes, q);
                const int64_t n = len < BLOCK ? len : BLOCK;
                float *restrict dst = wr + c0 + b * BLOCK;
                if (n == BLOCK) {
                    for (int k = 0; k < 4; k++) {
                        const v8f v = (q[k] - z) * s;
                        memcpy(dst + 8 * k, &v, sizeof v);
                    }
                } else {
                    for (int64_t c = 0; c < n; c++) dst[c] = s * (q[c / 8][c % 8] - z);
                }
                len -= n;
            }
        }
        if (L->hi_cols) {
            for (int64_t e = L->rowptr[r]; e < L->rowptr[r + 1]; e++)
                wr[L->hi_cols[e]] = hi_row_weight(L, r, e);
        } else if (L->rowptr) {
            int64_t e = L->rowptr[r];
            for (int64_t g = 0; g < L->hi_n_groups; g++)
                for (const int64_t end = e + L->hi_counts[r * L->hi_n_groups + g]; e < end; e++) {
                    int64_t col;
                    const float w = hi_weight(L, r, g, e, &col);
                    wr[col] = w;
                }
        }
    }
}

typedef void (*matvec_fn)(const call_t *, int64_t, int64_t);
typedef void (*dequant_fn)(const layer_t *, float *, int64_t, int64_t, int64_t);

#define SPECIALISE(B)                                                                     \
    static void matvec_##B##_1(const call_t *C, int64_t r0, int64_t r1) {                 \
        matvec_impl(B, 1, C, r0, r1);                                                     \
    }                                                                                     \
    static void matvec_##B##_m(const call_t *C, int64_t r0, int64_t r1) {                 \
        matvec_impl(B, C->m, C, r0, r1);                                                  \
    }                                                                                     \
    static void dequant_##B(const layer_t *L, float *w, int64_t ldw, int64_t r0, int64_t r1) { \
        dequant_impl(B, L, w, ldw, r0, r1);                                               \
    }
SPECIALISE(2)
SPECIALISE(3)
SPECIALISE(4)
SPECIALISE(8)

static inline void split_rows(int64_t n, int64_t *r0, int64_t *r1) {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    *r0 = n * t / nt;
    *r1 = n * (t + 1) / nt;
}

/* Sums of x over each group of layer L: sums[i * n_groups + g] for row i. */
static void group_sums(const layer_t *L, const float *x, int64_t m, int64_t ldx, float *sums) {
    const int64_t gp = L->n_blocks * BLOCK;
    for (int64_t i = 0; i < m; i++)
        for (int64_t g = 0; g < L->n_groups; g++) {
            const float *xg = x + i * ldx + g * gp;
            float t = 0.0f;
            for (int64_t c = 0; c < group_blocks(L, g) * BLOCK; c++) t += xg[c];
            sums[i * L->n_groups + g] = t;
        }
}

static matvec_fn matvec_kernel(const layer_t *L, int64_t m) {
    switch (L->bits) {
        case 2: return m == 1 ? matvec_2_1 : matvec_2_m;
        case 3: return m == 1 ? matvec_3_1 : matvec_3_m;
        case 4: return m == 1 ? matvec_4_1 : matvec_4_m;
        default: return m == 1 ? matvec_8_1 : matvec_8_m;
    }
}

/* Layers that read the same input (a block's query, key and value projections,
 * or its gate and up projections) in one parallel region: n <= MAX_LAYERS
 * layers, all with the same padded input layout. y (m, ldy) holds the layers'
 * outputs side by side, layer j's columns starting at the sum of the earlier
 * layers' n_out; y = x W_j^T + bias[j] (bias[j] may be NULL). 1 <= m <= MAXM,
 * x (m, row_blocks * 32) in the padded layout (zeros in the padding; x itself
 * when every group is a multiple of 32 columns). Returns 0, or -1 for n or m
 * out of range or no memory for the group sums (y is then not written). */
int lwq_matvec(const layer_t *const *Ls, int64_t n, const float *x, int64_t m, int64_t ldx,
               const float *const *bias, float *y, int64_t ldy, int threads) {
    if (n < 1 || n > MAX_LAYERS || m < 0 || m > MAXM) return -1;
    int64_t n_sums = 0, first_chunk[MAX_LAYERS + 1] = {0}, offset = 0;
    call_t calls[MAX_LAYERS];
    matvec_fn fns[MAX_LAYERS];
    for (int64_t j = 0; j < n; j++)
        n_sums += m * (Ls[j]->n_groups + (Ls[j]->hi_grid ? Ls[j]->hi_grid->n_groups : 0));
    float stack_sums[MAXM * 64];
    float *sums = n_sums <= MAXM * 64 ? stack_sums : malloc(sizeof(float) * n_sums);
    if (!sums) return -1;
    float *s = sums;
    int two_bit = 0;
    for (int64_t j = 0; j < n; j++)
        two_bit |= Ls[j]->bits == 2 || (Ls[j]->hi_grid && Ls[j]->hi_grid->bits == 2);
    float stack_x4[MAXM * 1024];
    float *x4 = NULL;
    if (two_bit) {
        x4 = m * ldx <= MAXM * 1024 ? stack_x4 : malloc(sizeof(float) * m * ldx);
        if (!x4) {
            if (sums != stack_sums) free(sums);
            return -1;
        }
        for (int64_t i = 0; i < m; i++)
            for (int64_t c = 0; c < ldx; c++) {
                static const float down[4] = {1.0f, 0.25f, 0.0625f, 0.015625f};
                x4[i * ldx + c] = x[i * ldx + c] * down[(c % BLOCK) / 8];
            }
    }
    for (int64_t j = 0; j < n; j++) {
        const layer_t *L = Ls[j];
        float *lo_sums = s, *hi_sums = NULL;
        group_sums(L, x, m, ldx, lo_sums);
        s += m * L->n_groups;
        if (L->hi_grid) {
            hi_sums = s;
            group_sums(L->hi_grid, x, m, ldx, hi_sums);
            s += m * L->hi_grid->n_groups;
        }
        calls[j] = (call_t){L, x, x4, m, ldx, lo_sums, hi_sums, bias[j], y + offset, ldy};
        fns[j] = matvec_kernel(L, m);
        offset += L->n_out;
        first_chunk[j + 1] = first_chunk[j] + (L->n_out + ROW_CHUNK - 1) / ROW_CHUNK;
    }
    /* rows in chunks handed out as threads finish: the high-impact entries are
     * spread unevenly over rows and layers */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t k = 0; k < first_chunk[n]; k++) {
        int64_t j = 0;
        while (k >= first_chunk[j + 1]) j++;
        const int64_t r0 = (k - first_chunk[j]) * ROW_CHUNK, r1 = r0 + ROW_CHUNK;
        fns[j](&calls[j], r0, r1 < Ls[j]->n_out ? r1 : Ls[j]->n_out);
    }
    if (sums != stack_sums) free(sums);
    if (x4 && x4 != stack_x4) free(x4);
    return 0;
}

/* A gated MLP, down(act(gate(x)) * up(x)), in one call: gate and up in one
 * matrix-vector pass, the activation and product, then down. act 0: SiLU,
 * v / (1 + e^-v); act 1: GELU, tanh approximation. gate and up share the input
 * layout; down reads its input unpadded (n_in a multiple of 32 in every group).
 * bias holds gate's, up's and down's (each may be NULL). Returns 0, or -1 when
 * scratch memory cannot be had. */
int lwq_mlp(const layer_t *const *Ls, int act, const float *x, int64_t m, int64_t ldx,
            const float *const *bias, float *y, int64_t ldy, int threads) {
    const int64_t inner = Ls[0]->n_out;
    float *h = malloc(sizeof(float) * m * 3 * inner);
    if (!h) return -1;
    float *a = h + m * 2 * inner;
    if (lwq_matvec(Ls, 2, x, m, ldx, bias, h, 2 * inner, threads)) {
        free(h);
        return -1;
    }
    for (int64_t i = 0; i < m; i++) {
        const float *g = h + i * 2 * inner, *u = g + inner;
        float *ai = a + i * inner;
        if (act == 0)
            for (int64_t j = 0; j < inner; j++) ai[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        else
            for (int64_t j = 0; j < inner; j++) {
                const float v = g[j];
                ai[j] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v))) * u[j];
            }
    }
    const int status = lwq_matvec(Ls + 2, 1, a, m, inner, bias + 2, y, ldy, threads);
    free(h);
    return status;
}

/* w (n_out, n_in), row stride ldw: the layer's float weight. */
void lwq_dequantize(const layer_t *L, float *w, int64_t ldw, int threads) {
    dequant_fn fn;
    switch (L->bits) {
        case 2: fn = dequant_2; break;
        case 3: fn = dequant_3; break;
        case 4: fn = dequant_4; break;
        default: fn = dequant_8; break;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        split_rows(L->n_out, &r0, &r1);
        fn(L, w, ldw, r0, r1);
    }
}

/* 16-bit float weights (an embedding kept in its stored dtype and used as the
 * output head): eight weights to eight floats, float16 or bfloat16. */
static inline v8f load8h(const uint16_t *p, const int bf16) {
    if (bf16) {
#if defined(__AVX2__)
        const v8i w = (v8i)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
#else
        v8i w;
        for (int i = 0; i < 8; i++) w[i] = p[i];
#endif
        return (v8f)(w << 16);
    }
#if defined(__F16C__)
    return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    v8f v;
    for (int i = 0; i < 8; i++) v[i] = half_to_float(p[i]);
    return v;
#endif
}

typedef struct {
    const uint16_t *w;
    int64_t n_out, n_in;
    const float *x;
    int64_t m, ldx;
    const float *bias;
    float *y;
    int64_t ldy;
} half_call_t;

static inline __attribute__((always_inline)) void half_impl(
    const int bf16, const int64_t m, const half_call_t *C, int64_t r0, int64_t r1) {
    const int64_t whole = C->n_in / 8 * 8;
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = C->w + r * C->n_in;
        v8f acc[MAXM][2];
        for (int64_t i = 0; i < m; i++) acc[i][0] = acc[i][1] = (v8f){};
        int64_t c = 0;
        for (; c + 16 <= whole; c += 16) {
            const v8f w0 = load8h(wr + c, bf16), w1 = load8h(wr + c + 8, bf16);
            for (int64_t i = 0; i < m; i++) {
                acc[i][0] += load8f(C->x + i * C->ldx + c) * w0;
                acc[i][1] += load8f(C->x + i * C->ldx + c + 8) * w1;
            }
        }
        for (; c < whole; c += 8) {
            const v8f w0 = load8h(wr + c, bf16);
            for (int64_t i = 0; i < m; i++) acc[i][0] += load8f(C->x + i * C->ldx + c) * w0;
        }
        for (int64_t i = 0; i < m; i++) {
            float t = hsum(acc[i][0] + acc[i][1]);
            for (int64_t k = whole; k < C->n_in; k++) {
                const uint16_t h = wr[k];
                uint32_t bits = (uint32_t)h << 16;
                float w;
                if (bf16)
                    memcpy(&w, &bits, sizeof w);
                else
                    w = half_to_float(h);
                t += w * C->x[i * C->ldx + k];
            }
            C->y[i * C->ldy + r] = t + (C->bias ? C->bias[r] : 0.0f);
        }
    }
}

typedef void (*half_fn)(const half_call_t *, int64_t, int64_t);
static void half_f16_1(const half_call_t *C, int64_t r0, int64_t r1) { half_impl(0, 1, C, r0, r1); }
static void half_f16_m(const half_call_t *C, int64_t r0, int64_t r1) { half_impl(0, C->m, C, r0, r1); }
static void half_bf16_1(const half_call_t *C, int64_t r0, int64_t r1) { half_impl(1, 1, C, r0, r1); }
static void half_bf16_m(const half_call_t *C, int64_t r0, int64_t r1) { half_impl(1, C->m, C, r0, r1); }

/* y (m, n_out) = x W^T + bias for a 16-bit W (n_out, n_in), 1 <= m <= MAXM. */
void lwq_half_matvec(const uint16_t *w, int64_t n_out, int64_t n_in, int bf16, const float *x,
                     int64_t m, int64_t ldx, const float *bias, float *y, int64_t ldy,
                     int threads) {
    const half_call_t C = {w, n_out, n_in, x, m, ldx, bias, y, ldy};
    const half_fn fn = bf16 ? (m == 1 ? half_bf16_1 : half_bf16_m)
                            : (m == 1 ? half_f16_1 : half_f16_m);
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        split_rows(n_out, &r0, &r1);
        fn(&C, r0, r1);
    }
}

int lwq_abi_version(void) { return 3; }
