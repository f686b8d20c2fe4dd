/* The selective scan kernels for one vector width, included by _selective_scan.c once per code path with
 *   W       floats per vector (the path's native register width: 16, 8 or 4),
 *   SUFFIX  the path's name, appended to every function and type defined here,
 *   TARGET  the path's target attribute (empty for the baseline path),
 *   VMAX(x, b), VMIN(x, b)  lane-wise max / min against a bound (intrinsics where the ISA has them).
 * Every function is compiled for TARGET; the helpers are always inlined into the two entry points
 * NAME(forward) and NAME(backward), whose contracts are in _selective_scan.c.
 *
 * An item is (batch row, W adjacent channels); its n states are n vectors, in registers when n is the
 * compile-time 16 (MamFusion's d_state) and the ISA has enough of them.
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
#ifndef VMAX /* from the sign bit of the difference (exact in IEEE): integer and float arithmetic only */
KERNEL vf NAME(max)(vf x, vf bound) {
    const vi below = (vi)(x - bound) >> 31;
    return (vf)(((vi)bound & below) | ((vi)x & ~below));
}
KERNEL vf NAME(min)(vf x, vf bound) {
    const vi above = (vi)(bound - x) >> 31;
    return (vf)(((vi)bound & above) | ((vi)x & ~above));
}
#define VMAX NAME(max)
#define VMIN NAME(min)
#define KERNEL_OWNS_MINMAX
#endif
KERNEL float NAME(hsum)(vf v) {
    float s = 0.0f;
    for (int l = 0; l < W; l++) s += v[l];
    return s;
}

/* 2^x per lane, branch-free: x = r + f with r integer and |f| <= 1/2; 2^f by its degree-6 Taylor polynomial
 * (relative error < 1e-7, and exact to rounding near f = 0, where decays close to 1 compound over many
 * steps); 2^r from the exponent bits. x <= -127 gives 0 and x >= 128 gives inf, as exp2f would (subnormal
 * results are flushed to 0). */
KERNEL vf NAME(exp2)(vf x) {
    x = VMIN(VMAX(x, NAME(splat)(-127.0f)), NAME(splat)(128.0f));
    const vf magic = NAME(splat)(12582912.0f); /* 1.5 * 2^23: adding and subtracting it rounds to integer */
    const vf r = (x + magic) - magic, f = x - r;
    vf p = NAME(splat)(1.5403530e-04f);
    p = p * f + 1.3333558e-03f;
    p = p * f + 9.6181291e-03f;
    p = p * f + 5.5504109e-02f;
    p = p * f + 2.4022651e-01f;
    p = p * f + 6.9314718e-01f;
    p = p * f + 1.0f;
    const vi bits = (__builtin_convertvector(r, vi) + 127) << 23;
    return p * (vf)bits;
}

KERNEL vf NAME(sigmoid)(vf x) { return 1.0f / (1.0f + NAME(exp2)(x * -LOG2E)); }

/* One item's forward over all L steps; keeps the state entering every chunk when a->states is set. */
KERNEL void NAME(forward_item)(const struct scan_args *a, int64_t i, int64_t c0, const int ns) {
    const int64_t L = a->L, d = a->d, chunk = a->chunk, n_chunks = (L + chunk - 1) / chunk;
    vf A2[MAX_STATE], h[MAX_STATE];
    for (int s = 0; s < ns; s++) {
        A2[s] = NAME(load)(a->A + s * d + c0) * LOG2E;
        h[s] = NAME(splat)(0.0f);
    }
    const vf D = NAME(load)(a->D + c0);
    for (int64_t t = 0; t < L; t++) {
        if (a->states && t % chunk == 0) {
            float *out = a->states + (i * n_chunks + t / chunk) * ns * d + c0;
            for (int s = 0; s < ns; s++) NAME(store)(out + s * d, h[s]);
        }
        const int64_t row = i * L + t;
        const vf dt = NAME(load)(a->dt + row * d + c0), u = NAME(load)(a->u + row * d + c0), du = dt * u;
        const float *B = a->B + row * ns, *C = a->C + row * ns;
        vf y = D * u;
        for (int s = 0; s < ns; s++) {
            h[s] = NAME(exp2)(dt * A2[s]) * h[s] + du * B[s];
            y += h[s] * C[s];
        }
        if (a->z) {
            const vf z = NAME(load)(a->z + row * d + c0);
            y *= z * NAME(sigmoid)(z);
        }
        NAME(store)(a->y + row * d + c0, y);
    }
}

TARGET static void NAME(forward)(const struct scan_args *a) {
    for (int64_t i = a->i0; i < a->i1; i++)
        for (int64_t c0 = a->c0; c0 < a->c1; c0 += W) {
            if (a->n == 16)
                NAME(forward_item)(a, i, c0, 16);
            else
                NAME(forward_item)(a, i, c0, (int)a->n);
        }
}

/* Per-call backward scratch: one chunk's states, decays and output gradients for the item at hand, the
 * chunk's per-lane dB / dC for all of the call's channels, and each channel group's adjoint carry and dA, dD
 * sums across chunks. */
struct NAME(scratch) {
    vf *hs, *decays, *gys, *gB, *gC, *carry, *gA, *gD;
};

/* One item's backward over chunk c, whose entering state the forward kept. */
KERNEL void NAME(backward_chunk)(const struct scan_args *a, const struct NAME(scratch) *w, int64_t i, int64_t c,
                                 int64_t group, const int ns) {
    const int64_t L = a->L, d = a->d, chunk = a->chunk, n_chunks = (L + chunk - 1) / chunk;
    const int64_t c0 = a->c0 + group * W, t0 = c * chunk, len = L - t0 < chunk ? L - t0 : chunk;
    vf *hs = w->hs, *decays = w->decays, *gys = w->gys, *carry_out = w->carry + group * ns,
       *gA_out = w->gA + group * ns;
    vf A[MAX_STATE], A2[MAX_STATE], carry[MAX_STATE], gA[MAX_STATE];
    for (int s = 0; s < ns; s++) {
        A[s] = NAME(load)(a->A + s * d + c0);
        A2[s] = A[s] * LOG2E;
        carry[s] = carry_out[s];
        gA[s] = gA_out[s];
    }
    const vf D = NAME(load)(a->D + c0);
    vf gD = w->gD[group];
    const float *start = a->states + (i * n_chunks + c) * ns * d + c0;
    for (int s = 0; s < ns; s++) hs[s] = NAME(load)(start + s * d);
    /* re-run the chunk: hs[j + 1] = state after its step j, decays[j] = exp(dt A) of step j */
    for (int64_t j = 0; j < len; j++) {
        const int64_t row = i * L + t0 + j;
        const vf dt = NAME(load)(a->dt + row * d + c0), u = NAME(load)(a->u + row * d + c0), du = dt * u;
        const float *B = a->B + row * ns, *C = a->C + row * ns;
        const vf *h = hs + j * ns;
        vf *next = hs + (j + 1) * ns, *decay = decays + j * ns, y = D * u;
        for (int s = 0; s < ns; s++) {
            decay[s] = NAME(exp2)(dt * A2[s]);
            next[s] = decay[s] * h[s] + du * B[s];
            y += next[s] * C[s];
        }
        vf gy = NAME(load)(a->gy + row * d + c0);
        if (a->z) { /* out = y z sig(z): d/dy = z sig, d/dz = y sig (1 + z (1 - sig)) */
            const vf z = NAME(load)(a->z + row * d + c0), sig = NAME(sigmoid)(z);
            NAME(store)(a->gz + row * d + c0, gy * y * sig * (1.0f + z * (1.0f - sig)));
            gy *= z * sig;
        }
        gys[j] = gy;
    }
    /* adjoint: g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}, where `carry` holds the second term */
    for (int64_t j = len - 1; j >= 0; j--) {
        const int64_t row = i * L + t0 + j;
        const vf dt = NAME(load)(a->dt + row * d + c0), u = NAME(load)(a->u + row * d + c0), du = dt * u;
        const vf gy = gys[j];
        const float *B = a->B + row * ns, *C = a->C + row * ns;
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
        NAME(store)(a->gdt + row * d + c0, gdt + gdu * u);
        NAME(store)(a->gu + row * d + c0, gdu * dt + gy * D);
        gD += gy * u;
    }
    for (int s = 0; s < ns; s++) {
        carry_out[s] = carry[s];
        gA_out[s] = gA[s];
    }
    w->gD[group] = gD;
}

/* Batch row by batch row, chunk by chunk from the last, all of the call's channel groups per chunk (so the
 * chunk's per-lane dB / dC stay in cache until they are summed into a->gB / a->gC). 0, or -1 without memory. */
TARGET static int NAME(backward)(const struct scan_args *a) {
    const int64_t L = a->L, n = a->n, chunk = a->chunk, n_chunks = (L + chunk - 1) / chunk;
    const int64_t groups = (a->c1 - a->c0) / W;
    const size_t counts[8] = {(size_t)((chunk + 1) * n), (size_t)(chunk * n), (size_t)chunk, (size_t)(chunk * n),
                              (size_t)(chunk * n),       (size_t)(groups * n), (size_t)(groups * n), (size_t)groups};
    size_t total = 0;
    for (int k = 0; k < 8; k++) total += counts[k];
    vf *block = NULL;
    if (posix_memalign((void **)&block, 64, total * sizeof(vf)) != 0) return -1;
    struct NAME(scratch) w;
    vf **parts[8] = {&w.hs, &w.decays, &w.gys, &w.gB, &w.gC, &w.carry, &w.gA, &w.gD};
    for (int k = 0, offset = 0; k < 8; offset += (int)counts[k], k++) *parts[k] = block + offset;
    for (size_t k = 0; k < counts[6] + counts[7]; k++) w.gA[k] = NAME(splat)(0.0f); /* gA, gD: adjacent */
    for (int64_t i = a->i0; i < a->i1; i++) {
        for (size_t k = 0; k < counts[5]; k++) w.carry[k] = NAME(splat)(0.0f);
        for (int64_t c = n_chunks - 1; c >= 0; c--) {
            const int64_t t0 = c * chunk, len = L - t0 < chunk ? L - t0 : chunk;
            for (int64_t k = 0; k < len * n; k++) w.gB[k] = w.gC[k] = NAME(splat)(0.0f);
            for (int64_t g = 0; g < groups; g++) {
                if (n == 16)
                    NAME(backward_chunk)(a, &w, i, c, g, 16);
                else
                    NAME(backward_chunk)(a, &w, i, c, g, (int)n);
            }
            float *gB = a->gB + (i * L + t0) * n, *gC = a->gC + (i * L + t0) * n;
            for (int64_t k = 0; k < len * n; k++) {
                gB[k] += NAME(hsum)(w.gB[k]);
                gC[k] += NAME(hsum)(w.gC[k]);
            }
        }
    }
    for (int64_t g = 0; g < groups; g++) {
        const int64_t c0 = a->c0 + g * W;
        for (int64_t s = 0; s < n; s++)
            NAME(store)(a->gA + s * a->d + c0, NAME(load)(a->gA + s * a->d + c0) + w.gA[g * n + s]);
        NAME(store)(a->gD + c0, NAME(load)(a->gD + c0) + w.gD[g]);
    }
    free(block);
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
