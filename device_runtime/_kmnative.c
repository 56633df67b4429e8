/* The kernel-modulation rebuild, fused: W' = W * (1 + g(W / s)) for every row of a layer.
 *
 * A plain C library (no Python API) that device_runtime/native.py loads with ctypes; numpy's
 * km.modulate_fast is the fallback when it is absent, and km.modulate the definition both are
 * tested against (tests/test_native_rebuild.py). Why it exists: numpy spends most of a big layer's
 * rebuild in two tiny-K matmuls and a seven-pass GELU over temporaries, and on a small base in
 * per-layer call overhead; here each row's hidden units stay in registers, and one call rebuilds
 * every layer of a pack (km_modulate_layers).
 *
 * The modulator arrives prepared as km.modulate_fast prepares it (km_modulate_layers does it from
 * the pack's tensors with the same float32 products):
 *   w1  (d, h)  divided by s          b1 (h)
 *   w2  (h, d)  divided by the activation's gain (2 for gelu: vact computes 2*gelu)
 *   c2  (d)     b2 + 1
 * Rows are processed VW at a time: short rows (3x3 and 5x5 kernel modulators, narrow 1x1 convs)
 * transposed so every step runs across the VW rows, two such tiles interleaved (5-33 % faster
 * than one: their dependency chains overlap), long rows vectorised along themselves with the VW
 * dot products reduced by one transpose. Portable C with GCC/clang vector extensions: the
 * compiler maps them to SSE/AVX or NEON; x86-64 builds add AVX2+FMA and AVX-512 clones chosen at
 * load (target_clones). exp is a branch-free Cephes polynomial (relative error ~1e-7).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KM_ABI_VERSION 3
/* how rows are vectorised: along themselves from ROW_MIN_D floats on (from 16 with one hidden
 * unit), across VW rows below (measured on x86: 0.4-0.5 against 1.2-1.5 ns per weight at d 40-56,
 * h 1; across wins at d 32, h 4) */
#define ROW_MIN_D 64
#define ROW_MIN_D_ONE_HIDDEN 16

enum { ACT_RELU = 0, ACT_SILU = 1, ACT_TANH = 2, ACT_GELU = 3 };

/* GCC/clang vector extensions: eight floats, split by the compiler into what the target has (two
 * SSE or NEON registers, one AVX register) */
#define VW 8
typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));
#define INLINE static inline __attribute__((always_inline))
#if defined(__clang__)
#define UNROLL _Pragma("unroll 8")
#elif defined(__GNUC__)
#define UNROLL _Pragma("GCC unroll 8")
#else
#define UNROLL
#endif
#pragma GCC diagnostic ignored "-Wpsabi" /* the vector helpers are always inlined: no ABI crosses */

/* AVX-512 and AVX2+FMA clones of the entry point, picked by the loader (ifunc) for the CPU it runs
 * on; GCC 11 named the x86-64-v3/v4 levels. Elsewhere one build for the target's baseline (NEON on
 * aarch64, SSE2 on older x86 compilers). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && __GNUC__ >= 11
#define KM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KM_CLONES
#endif

INLINE vf splat(float a) { return (vf){a, a, a, a, a, a, a, a}; }
INLINE vf vsel(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }
INLINE vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
INLINE vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
/* lanes whose float is NaN or infinite (exponent bits all ones): the rebuilt kernel must be finite,
 * and checking here, while the value is in a register, saves the caller a pass over the output */
INLINE vi nonfinite(vf v) { return ((vi)v & 0x7f800000) == 0x7f800000; }
/* the same for one float, as bit 31 of the result (the exponent field plus one carries out only
 * when it is all ones): plain integer ORs, so the loops it sits in still vectorise */
INLINE uint32_t exponent_carry(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (bits & 0x7f800000u) + 0x00800000u;
}

#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* out[k][r] = in[r][k] for an 8x8 block: three rounds of two-input shuffles, which compilers map
 * to unpck/shufps/vperm2f128 on AVX and zip/trn on NEON */
INLINE void transpose8(const vf *in, vf *out)
{
    vf t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = SHUFFLE(in[i], in[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = SHUFFLE(in[i], in[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = SHUFFLE(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 1] = SHUFFLE(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[i + 2] = SHUFFLE(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[i + 3] = SHUFFLE(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int i = 0; i < 4; i++) {
        out[i] = SHUFFLE(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        out[i + 4] = SHUFFLE(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* exp(x), Cephes expf (relative error ~1e-7), branch-free, for x clamped to [-87, 60]
 * (EXP_BOUNDS): -87 keeps the result a normal float; 60 because every caller divides by 1 + exp(x),
 * and at 88 that quotient (a saturated gelu or silu of order 1e-37) times a small w2 gave denormal
 * products, each a ~100-cycle microcode assist on x86: a third of a small base's rebuild. Past 60
 * the quotient is below 1e-24 instead of exactly 0, far inside float32 noise of the sums it joins. */
INLINE vf vexp(vf x)
{
    x = vmax(vmin(x, splat(60.0f)), splat(-87.0f)); /* see EXP_BOUNDS */
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    vf r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
}

/* act(x) * gain, as km._activate_inplace leaves it: 2*gelu for gelu, the plain function else */
INLINE vf vact(vf x, int act)
{
    switch (act) {
    case ACT_RELU:
        return vmax(x, splat(0.0f));
    case ACT_SILU:
        return x / (1.0f + vexp(-x));
    case ACT_TANH: { /* tanh(x) = 2 / (1 + exp(-2x)) - 1 */
        return 2.0f / (1.0f + vexp(-2.0f * x)) - 1.0f;
    }
    default: { /* 2*gelu(x) = x*(1 + tanh(z)) = 2x / (1 + exp(-2z)), z = x*(C + C*A*x^2) */
        vf z = x * (0.7978845608028654f + 0.035677408136300125f * x * x);
        return 2.0f * x / (1.0f + vexp(-2.0f * z));
    }
    }
}

/* rows [whole, n) of x, fewer than a tile of ROWS, through a zero-padded copy (pad: 2 * ROWS * d
 * floats), so the tile code only ever sees whole tiles; TILE(in, out) rebuilds one tile */
#define PADDED_TAIL(TILE, ROWS)                                                \
    if (whole < n) {                                                           \
        int64_t tail = (n - whole) * d;                                        \
        memset(pad, 0, sizeof(float) * (size_t)((ROWS) * d));                  \
        memcpy(pad, x + whole * d, sizeof(float) * (size_t)tail);              \
        TILE(pad, pad + (ROWS) * d);                                           \
        memcpy(y + whole * d, pad + (ROWS) * d, sizeof(float) * (size_t)tail); \
    }

/* the rows of a partial tile, checked after the fact (the zero rows padding it are not the
 * kernel's, and must not count) */
static int tail_nonfinite(const float *y, int64_t count)
{
    uint32_t bad = 0;
    for (int64_t i = 0; i < count; i++) bad |= exponent_carry(y[i]);
    return (int)(bad >> 31);
}

/* 2 * VW short rows at once: two tiles of VW rows, each transposed so every step runs across its
 * rows, their steps interleaved (one tile's chains, the hidden sums, GELU's exp and division and
 * the output sums, are too short to keep the core busy). xt: 2 * d vectors, hid: 2 * h, the
 * caller's; always inlined: called with constant d and h, the loops unroll and the hidden units
 * live in registers. */
INLINE vi pair_across(const float *restrict x, float *restrict y, int64_t d, int64_t h,
                        const float *restrict w1, const float *restrict b1,
                        const float *restrict w2, const float *restrict c2, int act,
                        vf *restrict xt, vf *restrict hid)
{
    vi bad = {0};
    int64_t k0 = d - d % VW; /* columns [0, k0) come through in-register transposes, VW at a time */
    for (int t = 0; t < 2; t++) {
        const float *xs = x + t * VW * d;
        for (int64_t c = 0; c < k0; c += VW) {
            vf rows[VW];
            for (int r = 0; r < VW; r++) memcpy(&rows[r], xs + r * d + c, sizeof(vf));
            transpose8(rows, xt + t * d + c);
        }
        for (int64_t k = k0; k < d; k++)
            xt[t * d + k] = (vf){xs[k], xs[d + k], xs[2 * d + k], xs[3 * d + k],
                                 xs[4 * d + k], xs[5 * d + k], xs[6 * d + k], xs[7 * d + k]};
    }
    UNROLL for (int64_t j = 0; j < h; j++) hid[j] = hid[h + j] = splat(b1[j]);
    for (int64_t k = 0; k < d; k++) {
        vf v0 = xt[k], v1 = xt[d + k];
        UNROLL for (int64_t j = 0; j < h; j++) {
            float w = w1[k * h + j];
            hid[j] += v0 * w;
            hid[h + j] += v1 * w;
        }
    }
    UNROLL for (int64_t j = 0; j < h; j++) {
        hid[j] = vact(hid[j], act);
        hid[h + j] = vact(hid[h + j], act);
    }
    for (int64_t k = 0; k < d; k++) {
        vf g0 = splat(c2[k]), g1 = g0;
        UNROLL for (int64_t j = 0; j < h; j++) {
            float w = w2[j * d + k];
            g0 += hid[j] * w;
            g1 += hid[h + j] * w;
        }
        g0 *= xt[k];
        g1 *= xt[d + k];
        bad |= nonfinite(g0) | nonfinite(g1);
        if (k < k0) {
            xt[k] = g0;
            xt[d + k] = g1;
        } else {
            for (int r = 0; r < VW; r++) {
                y[r * d + k] = g0[r];
                y[(VW + r) * d + k] = g1[r];
            }
        }
    }
    for (int t = 0; t < 2; t++)
        for (int64_t c = 0; c < k0; c += VW) {
            vf rows[VW];
            transpose8(xt + t * d + c, rows);
            for (int r = 0; r < VW; r++) memcpy(y + (t * VW + r) * d + c, &rows[r], sizeof(vf));
        }
    return bad;
}

/* n short rows: whole tiles of 2 * VW rows in place, the rest through a zero-padded copy;
 * pad: 4 * VW * d floats */
INLINE int rows_across(const float *restrict x, float *restrict y, int64_t n, int64_t d, int64_t h,
                        const float *restrict w1, const float *restrict b1,
                        const float *restrict w2, const float *restrict c2, int act,
                        vf *restrict xt, vf *restrict hid, float *restrict pad)
{
    vi bad = {0};
    int64_t whole = n - n % (2 * VW);
    for (int64_t start = 0; start < whole; start += 2 * VW)
        bad |= pair_across(x + start * d, y + start * d, d, h, w1, b1, w2, c2, act, xt, hid);
#define TILE(in, out) pair_across(in, out, d, h, w1, b1, w2, c2, act, xt, hid)
    PADDED_TAIL(TILE, 2 * VW)
#undef TILE
    int any = whole < n && tail_nonfinite(y + whole * d, (n - whole) * d);
    for (int r = 0; r < VW; r++) any |= bad[r] != 0;
    return any;
}

/* VW long rows at once (a full tile), each vectorised along itself; the VW dot products of a hidden
 * unit are reduced together by one transpose, so every step has VW independent chains.
 * w1t: w1 transposed (h, d); hid: h vectors (across the rows); gain: d floats. */
INLINE uint32_t tile_along(const float *restrict x, float *restrict y, int64_t d, int64_t h,
                       const float *restrict w1t, const float *restrict b1,
                       const float *restrict w2, const float *restrict c2, int act,
                       vf *restrict hid, float *restrict gain)
{
    uint32_t bad = 0; /* bit 31 set: some output NaN or infinite (exponent_carry) */
    int64_t whole = d - d % VW;
    for (int64_t j = 0; j < h; j++) {
        const float *w = w1t + j * d;
        vf acc[VW], sums[VW];
        for (int r = 0; r < VW; r++) acc[r] = splat(0.0f);
        for (int64_t k = 0; k < whole; k += VW) {
            vf wk;
            memcpy(&wk, w + k, sizeof wk);
            for (int r = 0; r < VW; r++) {
                vf xk;
                memcpy(&xk, x + r * d + k, sizeof xk);
                acc[r] += xk * wk;
            }
        }
        transpose8(acc, sums); /* sums[l][r]: lane l of row r's partial sums */
        vf total = ((sums[0] + sums[1]) + (sums[2] + sums[3])) + ((sums[4] + sums[5]) + (sums[6] + sums[7]));
        for (int64_t k = whole; k < d; k++)
            for (int r = 0; r < VW; r++) total[r] += x[r * d + k] * w[k];
        hid[j] = vact(total + b1[j], act);
    }
    for (int r = 0; r < VW; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        if (h == 1) { /* the default channel modulator */
            float a = hid[0][r];
            for (int64_t k = 0; k < d; k++) {
                float v = xr[k] * (c2[k] + a * w2[k]);
                yr[k] = v;
                bad |= exponent_carry(v);
            }
            continue;
        }
        memcpy(gain, c2, sizeof(float) * (size_t)d);
        for (int64_t j = 0; j < h; j++) {
            float a = hid[j][r];
            const float *w = w2 + j * d;
            for (int64_t k = 0; k < d; k++) gain[k] += a * w[k];
        }
        for (int64_t k = 0; k < d; k++) {
            float v = xr[k] * gain[k];
            yr[k] = v;
            bad |= exponent_carry(v);
        }
    }
    return bad;
}

/* n long rows: whole tiles in place, the last partial one through a zero-padded copy
 * (pad: 2 * VW * d floats) */
INLINE int rows_along(const float *restrict x, float *restrict y, int64_t n, int64_t d, int64_t h,
                       const float *restrict w1t, const float *restrict b1,
                       const float *restrict w2, const float *restrict c2, int act,
                       vf *restrict hid, float *restrict gain, float *restrict pad)
{
    uint32_t bad = 0;
    int64_t whole = n - n % VW;
    for (int64_t start = 0; start < whole; start += VW)
        bad |= tile_along(x + start * d, y + start * d, d, h, w1t, b1, w2, c2, act, hid, gain);
#define TILE(in, out) tile_along(in, out, d, h, w1t, b1, w2, c2, act, hid, gain)
    PADDED_TAIL(TILE, VW)
#undef TILE
    return (int)(bad >> 31) | (whole < n && tail_nonfinite(y + whole * d, (n - whole) * d));
}

int km_abi_version(void) { return KM_ABI_VERSION; }

/* y[i] = x[i] * (1 + g(x[i] / s)) for n rows of length d (both C-contiguous, not overlapping).
 * w1t is w1 transposed (h, d), used for long rows. Returns 0 when every output is finite, 1 when
 * some is NaN or infinite, -1 when scratch cannot be had or an argument is out of range (the caller
 * then uses numpy). Threads may call it at once. */
KM_CLONES
int km_modulate_rows(const float *x, float *y, int64_t n, int64_t d, int64_t h,
                     const float *w1, const float *w1t, const float *b1, const float *w2,
                     const float *c2, int act)
{
    if (n < 0 || d < 1 || h < 1 || act < ACT_RELU || act > ACT_GELU) return -1;
    if (n == 0) return 0;
    int bad = 0;
/* each activation its own call site, so it is inlined without a per-element switch */
#define BY_ACTIVATION(CALL)                            \
    switch (act) {                                     \
    case ACT_RELU: CALL(ACT_RELU); break;              \
    case ACT_SILU: CALL(ACT_SILU); break;              \
    case ACT_TANH: CALL(ACT_TANH); break;              \
    default: CALL(ACT_GELU); break;                    \
    }
    if (d < (h == 1 ? ROW_MIN_D_ONE_HIDDEN : ROW_MIN_D)) {
        float pad[4 * VW * ROW_MIN_D]; /* rows_across: two tiles of 2 * VW rows */
        /* the default kernel modulators of 3x3 and 5x5 convs: constant sizes, so registers */
#define ACROSS_FIXED(A) bad = rows_across(x, y, n, fixed_d, fixed_h, w1, b1, w2, c2, A, xt, hid, pad)
#define SPECIALISED(D, H)                                                              \
        if (d == (D) && h == (H)) {                                                    \
            const int64_t fixed_d = (D), fixed_h = (H); /* constants once inlined */   \
            vf xt[2 * (D)], hid[2 * (H)];                                              \
            BY_ACTIVATION(ACROSS_FIXED)                                                \
            return bad;                                                                \
        }
        SPECIALISED(9, 8)
        SPECIALISED(25, 8)
#undef SPECIALISED
#undef ACROSS_FIXED
        vf *scratch = aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)(2 * (d + h)));
        if (!scratch) return -1;
#define ACROSS(A) bad = rows_across(x, y, n, d, h, w1, b1, w2, c2, A, scratch, scratch + 2 * d, pad)
        BY_ACTIVATION(ACROSS)
#undef ACROSS
        free(scratch);
        return bad;
    }
    /* hid (h vectors), gain (d floats), pad (2 * VW * d floats) */
    size_t bytes = sizeof(vf) * (size_t)h + sizeof(float) * (size_t)(d + 2 * VW * d);
    vf *scratch = aligned_alloc(sizeof(vf), (bytes + sizeof(vf) - 1) / sizeof(vf) * sizeof(vf));
    if (!scratch) return -1;
    float *gain = (float *)(scratch + h), *pad = gain + d;
#define ALONG(A) bad = rows_along(x, y, n, d, h, w1t, b1, w2, c2, A, scratch, gain, pad)
    BY_ACTIVATION(ALONG)
#undef ALONG
#undef BY_ACTIVATION
    free(scratch);
    return bad;
}

/* Every layer of a pack in one call (the per-call cost of Python and ctypes was most of a small
 * base's rebuild). Per layer i, meta[8i..8i+7] = n, d, h, act, x (address of the frozen rows),
 * y offset (floats into arena), params offset (floats into params: w1 (d, h), b1 (h), w2 (h, d),
 * b2 (d), as the pack stores them), and meta[8i+7] is set to 1 when some output of the layer is
 * NaN or infinite, else 0; scales[2i], scales[2i+1] = 1/s, 1/activation gain.
 * The modulator is prepared here exactly as km.modulate_fast prepares it (float32 products), so
 * this gives the same numbers as km_modulate_rows per layer. Returns 0, or -(i + 1) for the
 * first layer that could not be rebuilt. */
int km_modulate_layers(int64_t count, int64_t *meta, const float *scales,
                       const float *params, float *arena)
{
    int64_t most = 0;
    for (int64_t i = 0; i < count; i++) {
        int64_t dh = meta[8 * i + 1] * meta[8 * i + 2];
        if (meta[8 * i + 1] < 1 || meta[8 * i + 2] < 1) return (int)-(i + 1);
        most = dh > most ? dh : most;
    }
    /* w1 / s, its transpose, w2 / gain (d*h each) and b2 + 1 (d <= d*h) */
    float *prepared = malloc(sizeof(float) * (size_t)(4 * most + 1));
    if (!prepared) return -1;
    int status = 0;
    for (int64_t i = 0; i < count && status == 0; i++) {
        int64_t *m = meta + 8 * i;
        int64_t n = m[0], d = m[1], h = m[2];
        const float *w1 = params + m[6], *b1 = w1 + d * h, *w2 = b1 + h, *b2 = w2 + h * d;
        float inv_s = scales[2 * i], inv_gain = scales[2 * i + 1];
        float *w1s = prepared, *w1t = w1s + most, *w2s = w1t + most, *c2 = w2s + most;
        for (int64_t k = 0; k < d; k++)
            for (int64_t j = 0; j < h; j++) {
                w1s[k * h + j] = w1[k * h + j] * inv_s;
                w1t[j * d + k] = w1s[k * h + j];
            }
        for (int64_t e = 0; e < h * d; e++) w2s[e] = w2[e] * inv_gain;
        for (int64_t k = 0; k < d; k++) c2[k] = b2[k] + 1.0f;
        int rc = km_modulate_rows((const float *)(intptr_t)m[4], arena + m[5], n, d, h, w1s, w1t,
                                  b1, w2s, c2, (int)m[3]);
        if (rc < 0)
            status = (int)-(i + 1);
        m[7] = rc; /* 1: some output of this layer is NaN or infinite */
    }
    free(prepared);
    return status;
}
