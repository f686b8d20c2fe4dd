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
#include <immintrin.h>
#define HAVE_X86_PATHS 1
#endif

#define LANES 16 /* channels per item on the widest path; d_inner must be a multiple of it */
#define MAX_STATE 64
#define LOG2E 1.4426950408889634f

struct scan_args {
    const float *u, *dt, *A, *B, *C, *D, *z, *gy; /* inputs; z may be NULL; gy only for the backward */
    float *y, *states;                            /* forward outputs; states may be NULL (no backward) */
    float *gu, *gdt, *gz, *gA, *gD, *gB, *gC;     /* backward outputs; gz NULL iff z is */
    int64_t b, L, d, n, chunk;
    int64_t i0, i1, c0, c1; /* this call's items: batch rows [i0, i1) x channels [c0, c1) */
};

#define W 4
#define SUFFIX portable
#define TARGET
#include "_selective_scan_kernel.h" /* without VMAX / VMIN: it defines portable ones */
#undef W
#undef SUFFIX
#undef TARGET

#ifdef HAVE_X86_PATHS
#define W 8
#define SUFFIX avx2
#define TARGET __attribute__((target("avx2,fma")))
#define VMAX(x, b) _mm256_max_ps(x, b)
#define VMIN(x, b) _mm256_min_ps(x, b)
#include "_selective_scan_kernel.h"
#undef W
#undef SUFFIX
#undef TARGET
#undef VMAX
#undef VMIN

#define W 16
#define SUFFIX avx512
#define TARGET __attribute__((target("avx512f")))
#define VMAX(x, b) _mm512_max_ps(x, b)
#define VMIN(x, b) _mm512_min_ps(x, b)
#include "_selective_scan_kernel.h"
#undef W
#undef SUFFIX
#undef TARGET
#undef VMAX
#undef VMIN
#endif

struct path {
    const char *name;
    void (*forward)(const struct scan_args *);
    int (*backward)(const struct scan_args *); /* 0, or -1 when out of memory */
    int supported;                             /* set once at import from the CPU's feature bits */
};

static struct path paths[] = { /* best first */
#ifdef HAVE_X86_PATHS
    {"avx512", forward_avx512, backward_avx512, 0},
    {"avx2", forward_avx2, backward_avx2, 0},
#endif
    {"portable", forward_portable, backward_portable, 1},
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
    a->i0 = items[0], a->i1 = items[1], a->c0 = items[2] * LANES, a->c1 = items[3] * LANES;
    if (a->b < 1 || a->L < 1 || a->d < 1 || a->n < 1 || chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "batch, length, d_inner, d_state and chunk must be positive");
        return -1;
    }
    if (a->d % LANES || a->n > MAX_STATE) {
        PyErr_Format(PyExc_ValueError, "d_inner must be a multiple of %d and d_state at most %d", LANES,
                     MAX_STATE);
        return -1;
    }
    if (a->i0 < 0 || a->i0 > a->i1 || a->i1 > a->b || a->c0 < 0 || a->c0 > a->c1 || a->c1 > a->d) {
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
    path->forward(&a);
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
             "(b*L*d). Writes gu, gdt, gz (None iff z is): b*L*d, for the items; adds their share of gA: n*d,\n"
             "gD: d, gB, gC: b*L*n. Releases the GIL.");

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
                                n_states, bld, bld, bld, a.n * a.d, a.d, bln, bln};
    struct buffers bufs = {.held = 0};
    PyObject *result = NULL;
    float *p[16];
    for (int k = 0; k < 16; k++)
        if (get_floats(&bufs, o[k], names[k], counts[k], k >= 9, k == 6 || k == 11, &p[k]) < 0) goto done;
    a.u = p[0], a.dt = p[1], a.A = p[2], a.B = p[3], a.C = p[4], a.D = p[5], a.z = p[6], a.gy = p[7];
    a.states = p[8], a.gu = p[9], a.gdt = p[10], a.gz = p[11], a.gA = p[12], a.gD = p[13];
    a.gB = p[14], a.gC = p[15];
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = path->backward(&a);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
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
