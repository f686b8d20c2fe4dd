/* The selective scan kernels for one vector width, included by _selective_scan.c once per code path with
 *   W       floats per vector: the path's native register width (16, 8 or 4),
 *   SUFFIX  the path's name, appended to every function and type defined here,
 *   TARGET  the path's target attribute (empty for the baseline path),
 *   VMAX(x, b), VMIN(x, b)  lane-wise max / min (intrinsics where the ISA has them; else defined here).
 * Every function is compiled for TARGET. The helpers are always inlined into the two entry points,
 * NAME(forward) and NAME(backward), whose contracts are struct scan_args's in _selective_scan.c.
 *
 * An item is (batch row, W adjacent channels). Its n states are n vectors, held in registers when n is the
 * compile-time 16 (MamFusion's d_state) and the ISA has enough of them. Time is processed in chunks: a chunk's
 * inputs are first gathered into W-wide tiles (whatever the tensors' strides) and its outputs scattered back.
 */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(x) CAT(x, SUFFIX)
#define vf NAME(vf)
#define vi NAME(vi)
#define vf_unaligned NAME(vf_unaligned)
#define KERNEL TARGET static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
/* loads and stores at any float's address, allowed to alias the float arrays they read and write */
typedef float vf_unaligned __attribute__((vector_size(W * sizeof(float)), aligned(4), may_alias));

KERNEL vf NAME(load)(const float *p) { return *(const vf_unaligned *)p; }
KERNEL void NAME(store)(float *p, vf v) { *(vf_unaligned *)p = v; }
KERNEL vf NAME(splat)(float x) { return (vf){0} + x; }
/* a where x's sign bit is set, else b: bit operations only */
KERNEL vf NAME(if_negative)(vf x, vf a, vf b) {
    const vi neg = (vi)x >> 31;
    return (vf)(((vi)a & neg) | ((vi)b & ~neg));
}
#ifndef VMAX /* from the sign of the difference, which IEEE arithmetic gets exactly right */
#define VMAX(x, b) NAME(if_negative)((x) - (b), b, x)
#define VMIN(x, b) NAME(if_negative)((b) - (x), b, x)
#define KERNEL_OWNS_MINMAX
#endif
KERNEL float NAME(hsum)(vf v) {
    float s = 0.0f;
    for (int l = 0; l < W; l++) s += v[l];
    return s;
}

/* exp(x) per lane, branch-free: x = r ln2 + f with r integer and |f| <= ln2 / 2, f computed with ln2 split in
 * two (Cody-Waite, so large |x| keep their relative precision); exp(f) by its degree-6 Taylor polynomial
 * (relative error < 1.2e-7, exact to rounding near f = 0, where decays close to 1 compound over many steps);
 * 2^r from the exponent bits. x <= -127 ln2 gives 0 and x >= 128 ln2 gives inf (subnormal results are
 * flushed to 0). */
KERNEL vf NAME(exp)(vf x) {
    x = VMIN(VMAX(x, NAME(splat)(-88.02969193f)), NAME(splat)(88.72283906f));
    const vf magic = NAME(splat)(12582912.0f); /* 1.5 * 2^23: adding and subtracting it rounds to integer */
    const vf r = (x * LOG2E + magic) - magic;
    const vf f = (x - r * 0.693359375f) - r * -2.12194440e-4f; /* ln2 = 0.693359375 - 2.12194440e-4 */
    vf p = NAME(splat)(1.0f / 720);
    p = p * f + 1.0f / 120;
    p = p * f + 1.0f / 24;
    p = p * f + 1.0f / 6;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const vi bits = (__builtin_convertvector(r, vi) + 127) << 23;
    return p * (vf)bits;
}

KERNEL vf NAME(sigmoid)(vf x) { return 1.0f / (1.0f + NAME(exp)(-x)); }

/* softplus(x) = max(x, 0) + log1p(e) with e = exp(-|x|), and its derivative sigmoid(x) into *sig.
 * log1p(e) = 2 atanh(s) with s = e / (2 + e) <= 1/3, by its series to s^13 (relative error < 2e-8, for
 * tiny e too, so softplus of very negative x keeps its relative precision). */
KERNEL vf NAME(softplus)(vf x, vf *sig) {
    const vf e = NAME(exp)((vf)((vi)x | (int32_t)0x80000000)); /* -|x|: the sign bit set */
    const vf s = e / (2.0f + e), s2 = s * s;
    vf p = NAME(splat)(1.0f / 13);
    p = p * s2 + 1.0f / 11;
    p = p * s2 + 1.0f / 9;
    p = p * s2 + 1.0f / 7;
    p = p * s2 + 1.0f / 5;
    p = p * s2 + 1.0f / 3;
    p = p * s2 + 1.0f;
    const vf zero = NAME(splat)(0.0f);
    *sig = NAME(if_negative)(x, e, NAME(splat)(1.0f)) / (1.0f + e);
    return NAME(if_negative)(x, zero, x) + 2.0f * s * p;
}

/* The tile of (b, ·, L) tensor x for batch row i, channels [c0, c0 + valid), steps [t0, t0 + len): tile[j]
 * holds step t0 + j, lanes from `valid` on are zero. One vector load per step where channels are adjacent,
 * else W scalar loads (mamba_ssm's (b, d, L) layout). */
KERNEL void NAME(gather)(vf *tile, const struct tensor3 *x, int64_t i, int64_t c0, int64_t t0, int64_t len,
                         int valid) {
    const float *p = x->p + i * x->sb + c0 * x->sc + t0 * x->st;
    if (valid == W && x->sc == 1) {
        for (int64_t j = 0; j < len; j++) tile[j] = NAME(load)(p + j * x->st);
        return;
    }
    for (int64_t j = 0; j < len; j++) {
        vf v = NAME(splat)(0.0f);
        if (valid == W) /* a constant lane count: the compiler builds v from W scalars in registers */
            for (int l = 0; l < W; l++) v[l] = p[j * x->st + l * x->sc];
        else
            for (int l = 0; l < valid; l++) v[l] = p[j * x->st + l * x->sc];
        tile[j] = v;
    }
}

/* The inverse of gather: the tile's first `valid` lanes into x. */
KERNEL void NAME(scatter)(const struct tensor3 *x, const vf *tile, int64_t i, int64_t c0, int64_t t0,
                          int64_t len, int valid) {
    float *p = x->p + i * x->sb + c0 * x->sc + t0 * x->st;
    if (valid == W && x->sc == 1) {
        for (int64_t j = 0; j < len; j++) NAME(store)(p + j * x->st, tile[j]);
        return;
    }
    for (int64_t j = 0; j < len; j++) {
        const vf v = tile[j];
        if (valid == W)
            for (int l = 0; l < W; l++) p[j * x->st + l * x->sc] = v[l];
        else
            for (int l = 0; l < valid; l++) p[j * x->st + l * x->sc] = v[l];
    }
}

/* B and C of batch row i for steps [t0, t0 + len) as (len, n) arrays, shared by every channel group. */
KERNEL void NAME(gather_bc)(const struct scan_args *a, float *B, float *C, int64_t i, int64_t t0, int64_t len) {
    const int64_t n = a->n;
    for (int k = 0; k < 2; k++) {
        const struct tensor3 *x = k ? &a->C : &a->B;
        float *out = k ? C : B;
        for (int64_t s = 0; s < n; s++)
            for (int64_t j = 0; j < len; j++) out[j * n + s] = x->p[i * x->sb + s * x->sc + (t0 + j) * x->st];
    }
}

/* Per-call scratch, in vectors: chunk tiles, one chunk's states and decays for the item at hand, the chunk's
 * per-lane dB / dC summed over the call's channel groups, and per channel group what carries across chunks
 * (the forward's state; the backward's adjoint and its dA, dD, d(bias) sums). */
struct NAME(scratch) {
    vf *tu, *td, *tz, *ty, *tsig, *tgu, *tgd;  /* tiles: chunk vectors each */
    vf *hs, *decays, *gB, *gC;                 /* (chunk + 1) * n, then chunk * n each */
    vf *carry, *gA, *gD, *gbias;               /* groups * n, groups * n, groups, groups */
    float *B, *C;                              /* chunk * n floats each */
    vf *block;
};

/* One block for all of it (64-byte aligned); 0, or -1 without memory. */
TARGET static int NAME(scratch_alloc)(struct NAME(scratch) *w, const struct scan_args *a, int64_t groups) {
    const int64_t k = a->chunk, n = a->n, bc = (k * n + W - 1) / W;
    vf **parts[17] = {&w->tu,    &w->td,    &w->tz, &w->ty, &w->tsig,  &w->tgu,  &w->tgd,
                      &w->hs,    &w->decays, &w->gB, &w->gC, &w->carry, &w->gA, &w->gD,
                      &w->gbias, (vf **)&w->B, (vf **)&w->C};
    const int64_t counts[17] = {k,     k,     k,          k,          k,      k,      k, (k + 1) * n, k * n,
                                k * n, k * n, groups * n, groups * n, groups, groups, bc, bc};
    int64_t total = 0;
    for (int p = 0; p < 17; p++) total += counts[p];
    if (posix_memalign((void **)&w->block, 64, (size_t)total * sizeof(vf)) != 0) return -1;
    for (int64_t p = 0, offset = 0; p < 17; offset += counts[p], p++) *parts[p] = w->block + offset;
    for (int64_t v = 0; v < total; v++) w->block[v] = NAME(splat)(0.0f);
    return 0;
}

KERNEL int NAME(valid_lanes)(const struct scan_args *a, int64_t c0) {
    return a->d - c0 < W ? (int)(a->d - c0) : W;
}

/* The chunk's dt = softplus(delta + bias) (or delta + bias) into w->td, its derivative into w->tsig: ahead of
 * the recurrence, whose steps would otherwise each wait for this long dependency chain. */
KERNEL void NAME(prepare_dt)(const struct scan_args *a, const struct NAME(scratch) *w, int64_t c0, int64_t len) {
    const vf bias = NAME(load)(a->bias + c0);
    for (int64_t j = 0; j < len; j++) {
        const vf x = w->td[j] + bias;
        if (a->softplus) {
            w->td[j] = NAME(softplus)(x, &w->tsig[j]);
        } else {
            w->td[j] = x;
            w->tsig[j] = NAME(splat)(1.0f);
        }
    }
}

/* One item's forward over chunk c, from the state w->carry[group] it leaves there for the next chunk. */
KERNEL void NAME(forward_chunk)(const struct scan_args *a, const struct NAME(scratch) *w, int64_t i, int64_t c,
                                int64_t group, const int ns) {
    const int64_t L = a->L, dp = a->dp, chunk = a->chunk, n_chunks = (L + chunk - 1) / chunk;
    const int64_t c0 = a->c0 + group * W, t0 = c * chunk, len = L - t0 < chunk ? L - t0 : chunk;
    const int valid = NAME(valid_lanes)(a, c0);
    vf *saved = w->carry + group * ns, A[MAX_STATE], h[MAX_STATE];
    for (int s = 0; s < ns; s++) {
        A[s] = NAME(load)(a->A + s * dp + c0);
        h[s] = saved[s];
    }
    if (a->states) {
        float *out = a->states + (i * n_chunks + c) * ns * dp + c0;
        for (int s = 0; s < ns; s++) NAME(store)(out + s * dp, h[s]);
    }
    NAME(gather)(w->tu, &a->u, i, c0, t0, len, valid);
    NAME(gather)(w->td, &a->delta, i, c0, t0, len, valid);
    if (a->z.p) NAME(gather)(w->tz, &a->z, i, c0, t0, len, valid);
    const vf D = NAME(load)(a->D + c0);
    NAME(prepare_dt)(a, w, c0, len);
    if (a->z.p)
        for (int64_t j = 0; j < len; j++) w->tz[j] *= NAME(sigmoid)(w->tz[j]); /* the gate silu(z) */
    for (int64_t j = 0; j < len; j++) {
        const vf dt = w->td[j], u = w->tu[j], du = dt * u;
        const float *B = w->B + j * ns, *C = w->C + j * ns;
        vf y = D * u;
        for (int s = 0; s < ns; s++) {
            h[s] = NAME(exp)(dt * A[s]) * h[s] + du * B[s];
            y += h[s] * C[s];
        }
        w->ty[j] = a->z.p ? y * w->tz[j] : y;
    }
    NAME(scatter)(&a->y, w->ty, i, c0, t0, len, valid);
    for (int s = 0; s < ns; s++) saved[s] = h[s];
}

/* Batch row by batch row, chunk by chunk, every channel group of the call per chunk. 0, or -1. */
TARGET static int NAME(forward)(const struct scan_args *a) {
    const int64_t L = a->L, chunk = a->chunk, n_chunks = (L + chunk - 1) / chunk;
    const int64_t groups = (a->c1 - a->c0) / W;
    struct NAME(scratch) w;
    if (NAME(scratch_alloc)(&w, a, groups) < 0) return -1;
    for (int64_t i = a->i0; i < a->i1; i++) {
        for (int64_t v = 0; v < groups * a->n; v++) w.carry[v] = NAME(splat)(0.0f);
        for (int64_t c = 0; c < n_chunks; c++) {
            const int64_t t0 = c * chunk, len = L - t0 < chunk ? L - t0 : chunk;
            NAME(gather_bc)(a, w.B, w.C, i, t0, len);
            for (int64_t g = 0; g < groups; g++) {
                if (a->c0 + g * W >= a->d) break; /* all padding */
                if (a->n == 16)
                    NAME(forward_chunk)(a, &w, i, c, g, 16);
                else
                    NAME(forward_chunk)(a, &w, i, c, g, (int)a->n);
            }
        }
    }
    free(w.block);
    return 0;
}

/* One item's backward over chunk c: re-runs the chunk's forward from the state the forward kept, then the
 * adjoint recurrence back through it, carrying the adjoint to the previous chunk in w->carry[group]. */
KERNEL void NAME(backward_chunk)(const struct scan_args *a, const struct NAME(scratch) *w, int64_t i, int64_t c,
                                 int64_t group, const int ns) {
    const int64_t L = a->L, dp = a->dp, chunk = a->chunk, n_chunks = (L + chunk - 1) / chunk;
    const int64_t c0 = a->c0 + group * W, t0 = c * chunk, len = L - t0 < chunk ? L - t0 : chunk;
    const int valid = NAME(valid_lanes)(a, c0);
    vf *hs = w->hs, *decays = w->decays, *carry_out = w->carry + group * ns, *gA_out = w->gA + group * ns;
    vf A[MAX_STATE], carry[MAX_STATE], gA[MAX_STATE];
    for (int s = 0; s < ns; s++) {
        A[s] = NAME(load)(a->A + s * dp + c0);
        carry[s] = carry_out[s];
        gA[s] = NAME(splat)(0.0f); /* per-chunk sums, then added to the totals: less rounding over long L */
    }
    const vf D = NAME(load)(a->D + c0);
    vf gD = NAME(splat)(0.0f), gbias = gD;
    const float *start = a->states + (i * n_chunks + c) * ns * dp + c0;
    for (int s = 0; s < ns; s++) hs[s] = NAME(load)(start + s * dp);
    NAME(gather)(w->tu, &a->u, i, c0, t0, len, valid);
    NAME(gather)(w->td, &a->delta, i, c0, t0, len, valid);
    NAME(gather)(w->ty, &a->gy, i, c0, t0, len, valid); /* ty: the output gradient, then dLoss/dy */
    if (a->z.p) NAME(gather)(w->tz, &a->z, i, c0, t0, len, valid);
    NAME(prepare_dt)(a, w, c0, len);
    /* re-run the chunk: hs[j + 1] = state after its step j, decays[j] = exp(dt A) of step j */
    for (int64_t j = 0; j < len; j++) {
        const vf dt = w->td[j], u = w->tu[j], du = dt * u;
        const float *B = w->B + j * ns, *C = w->C + j * ns;
        const vf *h = hs + j * ns;
        vf *next = hs + (j + 1) * ns, *decay = decays + j * ns, y = D * u;
        for (int s = 0; s < ns; s++) {
            decay[s] = NAME(exp)(dt * A[s]);
            next[s] = decay[s] * h[s] + du * B[s];
            y += next[s] * C[s];
        }
        if (a->z.p) { /* out = y z sig(z): d/dy = z sig, d/dz = y sig (1 + z (1 - sig)); tz becomes dz */
            const vf z = w->tz[j], zsig = NAME(sigmoid)(z), gout = w->ty[j];
            w->tz[j] = gout * y * zsig * (1.0f + z * (1.0f - zsig));
            w->ty[j] = gout * z * zsig;
        }
    }
    /* adjoint: g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}, where `carry` holds the second term */
    for (int64_t j = len - 1; j >= 0; j--) {
        const vf dt = w->td[j], u = w->tu[j], du = dt * u, gy = w->ty[j];
        const float *B = w->B + j * ns, *C = w->C + j * ns;
        const vf *h = hs + j * ns, *next = hs + (j + 1) * ns, *decay = decays + j * ns;
        vf *gB = w->gB + j * ns, *gC = w->gC + j * ns, gdu = NAME(splat)(0.0f), gdt = gdu;
        for (int s = 0; s < ns; s++) {
            const vf g = carry[s] + gy * C[s];
            gC[s] += gy * next[s];
            gB[s] += g * du;
            gdu += g * B[s];
            const vf m = g * decay[s] * h[s]; /* dLoss / d(dt A) */
            gdt += m * A[s];
            gA[s] += m * dt;
            carry[s] = decay[s] * g;
        }
        const vf gdelta = (gdt + gdu * u) * w->tsig[j];
        w->tgd[j] = gdelta;
        w->tgu[j] = gdu * dt + gy * D;
        gbias += gdelta;
        gD += gy * u;
    }
    NAME(scatter)(&a->gu, w->tgu, i, c0, t0, len, valid);
    NAME(scatter)(&a->gdelta, w->tgd, i, c0, t0, len, valid);
    if (a->z.p) NAME(scatter)(&a->gz, w->tz, i, c0, t0, len, valid);
    for (int s = 0; s < ns; s++) {
        carry_out[s] = carry[s];
        gA_out[s] += gA[s];
    }
    w->gD[group] += gD, w->gbias[group] += gbias;
}

/* Batch row by batch row, chunk by chunk from the last, every channel group of the call per chunk (so the
 * chunk's per-lane dB / dC stay in cache until they are summed into a->gB / a->gC). 0, or -1. */
TARGET static int NAME(backward)(const struct scan_args *a) {
    const int64_t L = a->L, n = a->n, dp = a->dp, chunk = a->chunk, n_chunks = (L + chunk - 1) / chunk;
    const int64_t groups = (a->c1 - a->c0) / W;
    struct NAME(scratch) w;
    if (NAME(scratch_alloc)(&w, a, groups) < 0) return -1;
    for (int64_t i = a->i0; i < a->i1; i++) {
        for (int64_t v = 0; v < groups * n; v++) w.carry[v] = NAME(splat)(0.0f);
        for (int64_t c = n_chunks - 1; c >= 0; c--) {
            const int64_t t0 = c * chunk, len = L - t0 < chunk ? L - t0 : chunk;
            NAME(gather_bc)(a, w.B, w.C, i, t0, len);
            for (int64_t v = 0; v < len * n; v++) w.gB[v] = w.gC[v] = NAME(splat)(0.0f);
            for (int64_t g = 0; g < groups; g++) {
                if (a->c0 + g * W >= a->d) break; /* all padding */
                if (n == 16)
                    NAME(backward_chunk)(a, &w, i, c, g, 16);
                else
                    NAME(backward_chunk)(a, &w, i, c, g, (int)n);
            }
            for (int64_t j = 0; j < len; j++)
                for (int64_t s = 0; s < n; s++) {
                    const int64_t at = i * a->gB.sb + s * a->gB.sc + (t0 + j) * a->gB.st;
                    a->gB.p[at] += NAME(hsum)(w.gB[j * n + s]);
                    a->gC.p[i * a->gC.sb + s * a->gC.sc + (t0 + j) * a->gC.st] += NAME(hsum)(w.gC[j * n + s]);
                }
        }
    }
    for (int64_t g = 0; g < groups; g++) {
        const int64_t c0 = a->c0 + g * W;
        for (int64_t s = 0; s < n; s++)
            NAME(store)(a->gA + s * dp + c0, NAME(load)(a->gA + s * dp + c0) + w.gA[g * n + s]);
        NAME(store)(a->gD + c0, NAME(load)(a->gD + c0) + w.gD[g]);
        NAME(store)(a->gbias + c0, NAME(load)(a->gbias + c0) + w.gbias[g]);
    }
    free(w.block);
    return 0;
}

#undef CAT_
#undef CAT
#undef NAME
#undef vf
#undef vi
#undef vf_unaligned
#undef KERNEL
#ifdef KERNEL_OWNS_MINMAX
#undef VMAX
#undef VMIN
#undef KERNEL_OWNS_MINMAX
#endif
