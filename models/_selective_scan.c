/* models._selective_scan: the fused Mamba-1 selective scan on CPU (forward and backward), a CPython extension.
 *
 * Built when the package is installed (setup.py, an optional extension: without a C compiler the install still
 * succeeds and models/selective_scan.py runs its chunked PyTorch scan). Nothing is compiled at run time.
 *
 * Per batch row i, channel c and state s (h = 0 before t = 0):
 *   h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,   y_t = (sum_s C_t,s h_t,s + D u_t) * (z_t sigmoid(z_t) if z)
 * dt already holds softplus(delta + bias) (done by PyTorch, which also differentiates it).
 *
 * Layout: u, dt, z, y and their gradients are (b, L, d) with channels innermost; B, C are (b, L, n); A is (n, d).
 * One work item is (batch row, group of LANES adjacent channels): it walks L sequentially, its states held as
 * n vectors of LANES channels (in registers where the ISA has enough), so each time step reads one cache line
 * per (b, L, d) tensor and the (b, L, n, d) state tensor never exists. Items are independent: the Python side
 * splits them over threads, each call releasing the GIL.
 *
 * The forward stores the state entering every `chunk` steps; the backward walks chunks last to first, re-runs
 * each chunk's forward from its stored state into a chunk-sized buffer (states and decays), then runs the
 * adjoint recurrence back through it. Sums over channels (dB, dC) are accumulated per lane into
 * (b, L, n, LANES) buffers and sums over batch and time (dA, dD) per item; Python adds the lanes up.
 *
 * Vectors are GCC/Clang vector extensions of LANES floats. The module is built for the architecture's
 * baseline (no -march=native) and each path is the same code compiled for its own instruction set with a
 * target attribute, chosen at run time from what the CPU reports: AVX-512F, AVX2 + FMA, or portable (SSE2 /
 * NEON, where the compiler splits each vector into several registers).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#define HAVE_X86_PATHS 1
#endif

#pragma GCC diagnostic ignored "-Wpsabi" /* vectors wider than the baseline ISA only live inside inlined code */

#define LANES 16
#define MAX_STATE 64
#define LOG2E 1.4426950408889634f

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

#define INLINE static inline __attribute__((always_inline))

INLINE vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
INLINE void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf vsplat(float x) { return (vf){0} + x; }
INLINE vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* 2^x for every lane, branch-free: x = n + f with n integer and |f| <= 1/2, 2^f by its Taylor polynomial
 * (relative error < 2e-7, and exact to rounding near f = 0 where decays close to 1 compound over many steps),
 * 2^n by building the exponent bits. x <= -127 gives 0 and x >= 128 gives inf, as exp2f would (up to
 * subnormals, which are flushed to 0). */
INLINE vf vexp2(vf x) {
    x = vselect(x > vsplat(-127.0f), x, vsplat(-127.0f));
    x = vselect(x < vsplat(128.0f), x, vsplat(128.0f));
    const vf magic = vsplat(12582912.0f); /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    vf r = (x + magic) - magic;
    vf f = x - r;
    vf p = vsplat(1.5252734e-05f);
    p = p * f + 1.5403530e-04f;
    p = p * f + 1.3333558e-03f;
    p = p * f + 9.6181291e-03f;
    p = p * f + 5.5504109e-02f;
    p = p * f + 2.4022651e-01f;
    p = p * f + 6.9314718e-01f;
    p = p * f + 1.0f;
    vi bits = (__builtin_convertvector(r, vi) + 127) << 23;
    return p * (vf)bits;
}

INLINE vf vsigmoid(vf x) { return vsplat(1.0f) / (vsplat(1.0f) + vexp2(x * -LOG2E)); }

struct scan_args {
    const float *u, *dt, *A, *B, *C, *D, *z, *gy; /* inputs; z may be NULL; gy only for the backward */
    float *y, *states;                            /* forward outputs; states may be NULL (no backward) */
    float *gu, *gdt, *gz, *gA, *gD, *gB, *gC;     /* backward outputs; gz NULL iff z is */
    int64_t b, L, d, n, chunk;
    int64_t i0, i1, g0, g1; /* this call's items: batch rows [i0, i1) x channel groups [g0, g1) */
    vf *scratch;            /* backward: (chunk + 1) * n state vectors, chunk * n decays, chunk gy vectors */
};

/* One item's forward. ns is a compile-time constant for the common d_state (16), so the state loop unrolls
 * and the states stay in registers; otherwise it is a loop over an array in L1. */
INLINE void forward_item(const struct scan_args *a, int64_t i, int64_t c0, const int ns) {
    const int64_t L = a->L, d = a->d, chunk = a->chunk, n_chunks = (L + chunk - 1) / chunk;
    vf A2[MAX_STATE], h[MAX_STATE];
    for (int s = 0; s < ns; s++) {
        A2[s] = vload(a->A + s * d + c0) * LOG2E;
        h[s] = vsplat(0.0f);
    }
    const vf D = vload(a->D + c0);
    for (int64_t t = 0; t < L; t++) {
        if (a->states && t % chunk == 0) {
            float *out = a->states + (i * n_chunks + t / chunk) * ns * d + c0;
            for (int s = 0; s < ns; s++) vstore(out + s * d, h[s]);
        }
        const int64_t row = i * L + t;
        const vf dt = vload(a->dt + row * d + c0), u = vload(a->u + row * d + c0), du = dt * u;
        const float *B = a->B + row * ns, *C = a->C + row * ns;
        vf y = D * u;
        for (int s = 0; s < ns; s++) {
            h[s] = vexp2(dt * A2[s]) * h[s] + du * B[s];
            y += h[s] * C[s];
        }
        if (a->z) {
            const vf z = vload(a->z + row * d + c0);
            y *= z * vsigmoid(z);
        }
        vstore(a->y + row * d + c0, y);
    }
}

/* One item's backward, chunk by chunk from the last. */
INLINE void backward_item(const struct scan_args *a, int64_t i, int64_t c0, const int ns) {
    const int64_t L = a->L, d = a->d, chunk = a->chunk, n_chunks = (L + chunk - 1) / chunk;
    vf *hs = a->scratch, *decays = hs + (chunk + 1) * ns, *gys = decays + chunk * ns;
    vf A[MAX_STATE], A2[MAX_STATE], carry[MAX_STATE], gA[MAX_STATE];
    for (int s = 0; s < ns; s++) {
        A[s] = vload(a->A + s * d + c0);
        A2[s] = A[s] * LOG2E;
        carry[s] = gA[s] = vsplat(0.0f);
    }
    const vf D = vload(a->D + c0);
    vf gD = vsplat(0.0f);
    for (int64_t c = n_chunks - 1; c >= 0; c--) {
        const int64_t t0 = c * chunk, len = L - t0 < chunk ? L - t0 : chunk;
        const float *start = a->states + (i * n_chunks + c) * ns * d + c0;
        for (int s = 0; s < ns; s++) hs[s] = vload(start + s * d);
        /* re-run the chunk: hs[j + 1] = state after its step j, decays[j] = exp(dt A) of step j */
        for (int64_t j = 0; j < len; j++) {
            const int64_t row = i * L + t0 + j;
            const vf dt = vload(a->dt + row * d + c0), u = vload(a->u + row * d + c0), du = dt * u;
            const float *B = a->B + row * ns, *C = a->C + row * ns;
            const vf *h = hs + j * ns;
            vf *next = hs + (j + 1) * ns, *decay = decays + j * ns, y = D * u;
            for (int s = 0; s < ns; s++) {
                decay[s] = vexp2(dt * A2[s]);
                next[s] = decay[s] * h[s] + du * B[s];
                y += next[s] * C[s];
            }
            vf gy = vload(a->gy + row * d + c0);
            if (a->z) { /* out = y * z * sig(z): d/dy = z sig, d/dz = y sig (1 + z (1 - sig)) */
                const vf z = vload(a->z + row * d + c0), sig = vsigmoid(z);
                vstore(a->gz + row * d + c0, gy * y * sig * (1.0f + z * (1.0f - sig)));
                gy *= z * sig;
            }
            gys[j] = gy;
        }
        /* adjoint: g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}, where `carry` holds the second term */
        for (int64_t j = len - 1; j >= 0; j--) {
            const int64_t row = i * L + t0 + j;
            const vf dt = vload(a->dt + row * d + c0), u = vload(a->u + row * d + c0), du = dt * u, gy = gys[j];
            const float *B = a->B + row * ns, *C = a->C + row * ns;
            float *gB = a->gB + row * ns * LANES, *gC = a->gC + row * ns * LANES;
            const vf *h = hs + j * ns, *next = hs + (j + 1) * ns, *decay = decays + j * ns;
            vf gdu = vsplat(0.0f), gdt = vsplat(0.0f);
            for (int s = 0; s < ns; s++) {
                const vf g = carry[s] + gy * C[s];
                vstore(gC + s * LANES, vload(gC + s * LANES) + gy * next[s]);
                vstore(gB + s * LANES, vload(gB + s * LANES) + g * du);
                gdu += g * B[s];
                const vf m = g * decay[s] * h[s]; /* dLoss / d(dt A) */
                gdt += m * A[s];
                gA[s] += m * dt;
                carry[s] = decay[s] * g;
            }
            vstore(a->gdt + row * d + c0, gdt + gdu * u);
            vstore(a->gu + row * d + c0, gdu * dt + gy * D);
            gD += gy * u;
        }
    }
    for (int s = 0; s < ns; s++) vstore(a->gA + s * d + c0, vload(a->gA + s * d + c0) + gA[s]);
    vstore(a->gD + c0, vload(a->gD + c0) + gD);
}

/* The loops shared by all paths, always inlined into each path's entry point so that every path is one
 * function compiled for its own instruction set. */
INLINE void run_items(const struct scan_args *a, int backward) {
    for (int64_t i = a->i0; i < a->i1; i++)
        for (int64_t g = a->g0; g < a->g1; g++) {
            if (backward) {
                if (a->n == 16)
                    backward_item(a, i, g * LANES, 16);
                else
                    backward_item(a, i, g * LANES, (int)a->n);
            } else {
                if (a->n == 16)
                    forward_item(a, i, g * LANES, 16);
                else
                    forward_item(a, i, g * LANES, (int)a->n);
            }
        }
}

static void run_portable(const struct scan_args *a, int backward) { run_items(a, backward); }
#ifdef HAVE_X86_PATHS
__attribute__((target("avx512f"))) static void run_avx512(const struct scan_args *a, int backward) {
    run_items(a, backward);
}
__attribute__((target("avx2,fma"))) static void run_avx2(const struct scan_args *a, int backward) {
    run_items(a, backward);
}
#endif

struct path {
    const char *name;
    void (*run)(const struct scan_args *, int);
    int supported; /* set once at import from the CPU's feature bits */
};

static struct path paths[] = { /* best first */
#ifdef HAVE_X86_PATHS
    {"avx512", run_avx512, 0},
    {"avx2", run_avx2, 0},
#endif
    {"portable", run_portable, 1},
};
#define N_PATHS ((Py_ssize_t)(sizeof paths / sizeof paths[0]))

static void detect_cpu(void) {
#ifdef HAVE_X86_PATHS
    __builtin_cpu_init(); /* also checks that the OS saves the wide registers (XCR0) */
    paths[0].supported = __builtin_cpu_supports("avx512f");
    paths[1].supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
}

static PyObject *py_paths(PyObject *self, PyObject *unused) {
    (void)self, (void)unused;
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out && i < N_PATHS; i++) {
        if (!paths[i].supported) continue;
        PyObject *name = PyUnicode_FromString(paths[i].name);
        if (!name || PyList_Append(out, name) < 0) Py_CLEAR(out);
        Py_XDECREF(name);
    }
    if (!out) return NULL;
    PyObject *tuple = PyList_AsTuple(out);
    Py_DECREF(out);
    return tuple;
}

/* The buffers one call borrows, released together. */
struct buffers {
    Py_buffer views[16];
    int held;
};

static void release(struct buffers *bufs) {
    while (bufs->held > 0) PyBuffer_Release(&bufs->views[--bufs->held]);
}

/* A C-contiguous float32 buffer of exactly `count` items (or NULL for None where `optional`). */
static int get_floats(struct buffers *bufs, PyObject *obj, const char *what, int64_t count, int writable,
                      int optional, float **out) {
    *out = NULL;
    if (obj == Py_None) {
        if (optional) return 0;
        PyErr_Format(PyExc_TypeError, "%s is required", what);
        return -1;
    }
    Py_buffer *view = &bufs->views[bufs->held];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    bufs->held++;
    const char *fmt = view->format ? view->format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
    if (view->itemsize != 4 || strcmp(fmt, "f") != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected float32 items, got format '%s'", what,
                     view->format ? view->format : "B");
        return -1;
    }
    if (view->len / 4 != count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %lld items, got %zd", what, (long long)count,
                     view->len / 4);
        return -1;
    }
    *out = view->buf;
    return 0;
}

static const struct path *find_path(const char *name) {
    for (Py_ssize_t i = 0; i < N_PATHS; i++)
        if (!strcmp(paths[i].name, name)) {
            if (paths[i].supported) return &paths[i];
            PyErr_Format(PyExc_ValueError, "selective scan path '%s' is not supported by this CPU", name);
            return NULL;
        }
    PyErr_Format(PyExc_ValueError, "unknown selective scan path '%s'", name);
    return NULL;
}

/* Shapes and item ranges, shared by forward and backward. */
static int check_dims(struct scan_args *a, long long dims[4], long long items[4], long long chunk) {
    a->b = dims[0], a->L = dims[1], a->d = dims[2], a->n = dims[3], a->chunk = chunk;
    a->i0 = items[0], a->i1 = items[1], a->g0 = items[2], a->g1 = items[3];
    if (a->b < 1 || a->L < 1 || a->d < 1 || a->n < 1 || chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "batch, length, d_inner, d_state and chunk must be positive");
        return -1;
    }
    if (a->d % LANES || a->n > MAX_STATE) {
        PyErr_Format(PyExc_ValueError, "d_inner must be a multiple of %d and d_state at most %d", LANES,
                     MAX_STATE);
        return -1;
    }
    if (a->i0 < 0 || a->i0 > a->i1 || a->i1 > a->b || a->g0 < 0 || a->g0 > a->g1 || a->g1 > a->d / LANES) {
        PyErr_SetString(PyExc_ValueError, "item range out of bounds");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(forward_doc,
             "forward(u, dt, A, B, C, D, z, y, states, dims, items, chunk, path)\n--\n\n"
             "Scan C-contiguous float32 buffers - u, dt, z (None allowed), y: b*L*d; A: n*d; B, C: b*L*n;\n"
             "D: d; states (None: not kept): b*ceil(L/chunk)*n*d - for dims = (b, L, d, n) and the items\n"
             "(i0, i1, g0, g1): batch rows [i0, i1) x channel groups of 16 [g0, g1). Releases the GIL.");

static PyObject *py_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[9]; /* u, dt, A, B, C, D, z, y, states */
    long long dims[4], items[4], chunk;
    const char *name;
    if (!PyArg_ParseTuple(args, "OOOOOOOOO(LLLL)(LLLL)Ls", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &o[7], &o[8], &dims[0], &dims[1], &dims[2], &dims[3], &items[0], &items[1],
                          &items[2], &items[3], &chunk, &name))
        return NULL;
    const struct path *path = find_path(name);
    struct scan_args a = {0};
    if (!path || check_dims(&a, dims, items, chunk) < 0) return NULL;
    const int64_t bld = a.b * a.L * a.d, bln = a.b * a.L * a.n;
    const int64_t n_states = a.b * ((a.L + chunk - 1) / chunk) * a.n * a.d;
    struct buffers bufs = {.held = 0};
    PyObject *result = NULL;
    float *p[9];
    if (get_floats(&bufs, o[0], "u", bld, 0, 0, &p[0]) < 0 || get_floats(&bufs, o[1], "dt", bld, 0, 0, &p[1]) < 0 ||
        get_floats(&bufs, o[2], "A", a.n * a.d, 0, 0, &p[2]) < 0 ||
        get_floats(&bufs, o[3], "B", bln, 0, 0, &p[3]) < 0 || get_floats(&bufs, o[4], "C", bln, 0, 0, &p[4]) < 0 ||
        get_floats(&bufs, o[5], "D", a.d, 0, 0, &p[5]) < 0 || get_floats(&bufs, o[6], "z", bld, 0, 1, &p[6]) < 0 ||
        get_floats(&bufs, o[7], "y", bld, 1, 0, &p[7]) < 0 ||
        get_floats(&bufs, o[8], "states", n_states, 1, 1, &p[8]) < 0)
        goto done;
    a.u = p[0], a.dt = p[1], a.A = p[2], a.B = p[3], a.C = p[4], a.D = p[5], a.z = p[6];
    a.y = p[7], a.states = p[8];
    Py_BEGIN_ALLOW_THREADS
    path->run(&a, 0);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release(&bufs);
    return result;
}

PyDoc_STRVAR(backward_doc,
             "backward(u, dt, A, B, C, D, z, gy, states, gu, gdt, gz, gA, gD, gB, gC, dims, items, chunk, "
             "path)\n--\n\n"
             "Gradients for `forward`'s items, given its inputs, its states and the output gradient gy\n"
             "(b*L*d). Writes gu, gdt, gz (None iff z is): b*L*d; adds to gA: n*d, gD: d and to the per-lane\n"
             "sums gB, gC: b*L*n*16. Releases the GIL.");

static PyObject *py_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[16]; /* u, dt, A, B, C, D, z, gy, states, gu, gdt, gz, gA, gD, gB, gC */
    long long dims[4], items[4], chunk;
    const char *name;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOO(LLLL)(LLLL)Ls", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                          &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15], &dims[0],
                          &dims[1], &dims[2], &dims[3], &items[0], &items[1], &items[2], &items[3], &chunk,
                          &name))
        return NULL;
    const struct path *path = find_path(name);
    struct scan_args a = {0};
    if (!path || check_dims(&a, dims, items, chunk) < 0) return NULL;
    if ((o[6] == Py_None) != (o[11] == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "gz must be given exactly when z is");
        return NULL;
    }
    const int64_t bld = a.b * a.L * a.d, bln = a.b * a.L * a.n;
    const int64_t n_states = a.b * ((a.L + chunk - 1) / chunk) * a.n * a.d;
    static const char *names[16] = {"u", "dt", "A", "B", "C", "D", "z", "gy",
                                    "states", "gu", "gdt", "gz", "gA", "gD", "gB", "gC"};
    const int64_t counts[16] = {bld, bld, a.n * a.d, bln, bln, a.d, bld, bld,
                                n_states, bld, bld, bld, a.n * a.d, a.d, bln * LANES, bln * LANES};
    struct buffers bufs = {.held = 0};
    PyObject *result = NULL;
    float *p[16];
    for (int k = 0; k < 16; k++)
        if (get_floats(&bufs, o[k], names[k], counts[k], k >= 9, k == 6 || k == 11, &p[k]) < 0) goto done;
    a.u = p[0], a.dt = p[1], a.A = p[2], a.B = p[3], a.C = p[4], a.D = p[5], a.z = p[6], a.gy = p[7];
    a.states = p[8], a.gu = p[9], a.gdt = p[10], a.gz = p[11], a.gA = p[12], a.gD = p[13];
    a.gB = p[14], a.gC = p[15];
    /* 64-byte aligned, as the vector type wants */
    size_t bytes = (size_t)((chunk + 1) * a.n + chunk * a.n + chunk) * sizeof(vf);
    void *scratch = NULL;
    if (posix_memalign(&scratch, 64, bytes) != 0) {
        PyErr_NoMemory();
        goto done;
    }
    a.scratch = scratch;
    Py_BEGIN_ALLOW_THREADS
    path->run(&a, 1);
    Py_END_ALLOW_THREADS
    free(scratch);
    result = Py_NewRef(Py_None);
done:
    release(&bufs);
    return result;
}

static PyMethodDef methods[] = {
    {"forward", py_forward, METH_VARARGS, forward_doc},
    {"backward", py_backward, METH_VARARGS, backward_doc},
    {"paths", py_paths, METH_NOARGS, "paths()\n--\n\nThe scan paths this CPU supports, best first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_selective_scan",
    .m_doc = "Fused Mamba-1 selective scan (forward and backward) on CPU, with run-time CPU dispatch.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__selective_scan(void) {
    detect_cpu();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "LANES", LANES) < 0 || PyModule_AddIntConstant(m, "MAX_STATE", MAX_STATE) < 0))
        Py_CLEAR(m);
    return m;
}
