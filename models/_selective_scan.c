/* models._selective_scan: the fused Mamba-1 selective scan on CPU (forward and backward), a CPython extension.
 *
 * Built when the package is installed (setup.py, an optional extension: without a C compiler the install still
 * succeeds and models/selective_scan.py runs its chunked PyTorch scan). Nothing is compiled at run time.
 *
 * Per batch row i, channel c and state s (h = 0 before t = 0), with dt = softplus(delta + bias):
 *   h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,   y_t = (sum_s C_t,s h_t,s + D u_t) * silu(z_t)   (z optional)
 * and the backward gives the gradients of every input (u, delta, A, B, C, D, z, bias).
 *
 * Parallel over (batch row x channels), sequential over L: one work item is a batch row and W adjacent
 * channels, W floats being one vector register of the path (16, 8 or 4), so the state of a (row, channel)
 * pair over d_state is d_state vectors (registers, for d_state 16, where the ISA has 32 of them) and the
 * (b, L, d_state, d_inner) state tensor never exists. Time is cut into chunks: a chunk's inputs are gathered
 * into W-wide tiles first, whatever the tensors' strides (one vector load per step where channels are
 * adjacent, as in the Mamba block's (b, L, d) memory; W scalar loads in mamba_ssm's (b, d, L) layout), and
 * its outputs scattered back, so callers never copy. The forward keeps the state entering every chunk; the
 * backward walks the chunks last to first, re-runs each chunk's forward from its kept state into a
 * chunk-sized buffer (states, decays), then runs the adjoint recurrence back through it. Sums over channels
 * (dB, dC) are kept per lane for the chunk and reduced once; sums over rows and time (dA, dD, d(bias)) per
 * chunk, then added up. The Python side splits items over threads, each call releasing the GIL.
 *
 * The kernels are written once (_selective_scan_kernel.h) over GCC/Clang vector extensions and included
 * once per path, each compiled for its own instruction set with a target attribute. The module is built
 * for the architecture's baseline (no -march=native) and picks the path at run time from what the CPU
 * reports: AVX-512F, else AVX2 + FMA, else portable (SSE2 on x86-64, NEON on ARM: the only path elsewhere).
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

#define LANES 16 /* channels per work item on the widest path: the unit of the Python side's item ranges */
#define MAX_STATE 64
#define LOG2E 1.4426950408889634f

/* A (b, ·, L) float32 tensor with any non-negative strides: element (i, c, t) is p[i*sb + c*sc + t*st]. */
struct tensor3 {
    float *p; /* NULL for an absent optional tensor (z, gz) */
    int64_t sb, sc, st;
};

/* One call's work. u, delta, z, gy, y, gu, gdelta, gz are (b, d, L); B, C, gB, gC are (b, n, L). A and gA
 * are (n, dp), D, bias, gD, gbias (dp) - contiguous, zero-padded to dp, d rounded up to LANES - and states
 * (b, n_chunks, n, dp) with n_chunks = ceil(L / chunk), or NULL when the forward keeps none. The forward
 * writes y (and states) for its items; the backward writes gu, gdelta, gz for its items and adds their share
 * to gB, gC, gA, gD and gbias. */
struct scan_args {
    struct tensor3 u, delta, z, B, C, y, gy, gu, gdelta, gz, gB, gC;
    const float *A, *D, *bias;
    float *states, *gA, *gD, *gbias;
    int64_t b, L, d, dp, n, chunk;
    int softplus;           /* dt = softplus(delta + bias), else delta + bias */
    int64_t i0, i1, c0, c1; /* the items: batch rows [i0, i1) x channels [c0, c1), c0 and c1 multiples of LANES */
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
    int (*forward)(const struct scan_args *);  /* 0, or -1 when out of memory */
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
    Py_buffer views[20];
    int held;
};

static void release(struct buffers *bufs) {
    while (bufs->held > 0) PyBuffer_Release(&bufs->views[--bufs->held]);
}

/* How one argument must look: `ndim` 3 with any strides and shape (b, rows, L) - rows d or n - or a
 * C-contiguous buffer of `count` floats (ndim 0). */
struct spec {
    const char *name;
    int ndim, rows_are_states, writable, optional;
    int64_t count;
};

static Py_buffer *get_buffer(struct buffers *bufs, PyObject *obj, const struct spec *spec) {
    Py_buffer *view = &bufs->views[bufs->held];
    int flags = (spec->ndim ? PyBUF_STRIDES : PyBUF_C_CONTIGUOUS) | PyBUF_FORMAT;
    if (PyObject_GetBuffer(obj, view, flags | (spec->writable ? PyBUF_WRITABLE : 0)) < 0) return NULL;
    bufs->held++;
    const char *fmt = view->format ? view->format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
    if (view->itemsize != 4 || strcmp(fmt, "f") != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected float32 items, got format '%s'", spec->name,
                     view->format ? view->format : "B");
        return NULL;
    }
    return view;
}

/* Parse `objs` (a tuple) against `specs` into `out` (tensor3 for ndim 3, float * for flat ones). */
static int get_arguments(struct buffers *bufs, PyObject *objs, const struct spec *specs, int count,
                         const struct scan_args *a, void **out) {
    if (!PyTuple_Check(objs) || PyTuple_GET_SIZE(objs) != count) {
        PyErr_Format(PyExc_TypeError, "expected a tuple of %d buffers", count);
        return -1;
    }
    for (int k = 0; k < count; k++) {
        const struct spec *spec = &specs[k];
        PyObject *obj = PyTuple_GET_ITEM(objs, k);
        if (obj == Py_None) {
            if (spec->optional) continue;
            PyErr_Format(PyExc_TypeError, "%s is required", spec->name);
            return -1;
        }
        Py_buffer *view = get_buffer(bufs, obj, spec);
        if (!view) return -1;
        if (!spec->ndim) {
            if (view->len / 4 != spec->count) {
                PyErr_Format(PyExc_ValueError, "%s: expected %lld floats, got %zd", spec->name,
                             (long long)spec->count, view->len / 4);
                return -1;
            }
            *(float **)out[k] = view->buf;
            continue;
        }
        const int64_t shape[3] = {a->b, spec->rows_are_states ? a->n : a->d, a->L};
        if (view->ndim != 3 || view->shape[0] != shape[0] || view->shape[1] != shape[1] ||
            view->shape[2] != shape[2]) {
            PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, %lld, %lld)", spec->name,
                         (long long)shape[0], (long long)shape[1], (long long)shape[2]);
            return -1;
        }
        struct tensor3 *t = out[k];
        int64_t *strides[3] = {&t->sb, &t->sc, &t->st};
        for (int dim = 0; dim < 3; dim++) {
            Py_ssize_t stride = view->strides[dim];
            /* outputs must not overlap themselves (threads write disjoint items) */
            if (stride < 0 || stride % 4 || (spec->writable && stride == 0 && shape[dim] > 1)) {
                PyErr_Format(PyExc_ValueError, "%s: unsupported strides", spec->name);
                return -1;
            }
            *strides[dim] = stride / 4;
        }
        t->p = view->buf;
    }
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

/* Shapes and the item range, shared by forward and backward. */
static int set_dims(struct scan_args *a, long long dims[4], long long items[4], long long chunk, int softplus) {
    a->b = dims[0], a->L = dims[1], a->d = dims[2], a->n = dims[3], a->chunk = chunk, a->softplus = softplus;
    a->dp = (a->d + LANES - 1) / LANES * LANES;
    a->i0 = items[0], a->i1 = items[1], a->c0 = items[2] * LANES, a->c1 = items[3] * LANES;
    if (a->b < 1 || a->L < 1 || a->d < 1 || a->n < 1 || chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "batch, length, d_inner, d_state and chunk must be positive");
        return -1;
    }
    if (a->n > MAX_STATE) {
        PyErr_Format(PyExc_ValueError, "d_state must be at most %d", MAX_STATE);
        return -1;
    }
    if (a->i0 < 0 || a->i0 > a->i1 || a->i1 > a->b || a->c0 < 0 || a->c0 > a->c1 || a->c1 > a->dp) {
        PyErr_SetString(PyExc_ValueError, "item range out of bounds");
        return -1;
    }
    return 0;
}

/* Parse (tensors, (b, L, d, n), (i0, i1, g0, g1), chunk, softplus, path) and run the path's forward or
 * backward without the GIL. */
static PyObject *run(PyObject *args, int backward) {
    PyObject *objs;
    long long dims[4], items[4], chunk;
    int softplus;
    const char *name;
    if (!PyArg_ParseTuple(args, "O!(LLLL)(LLLL)Lps", &PyTuple_Type, &objs, &dims[0], &dims[1], &dims[2], &dims[3],
                          &items[0], &items[1], &items[2], &items[3], &chunk, &softplus, &name))
        return NULL;
    const struct path *path = find_path(name);
    struct scan_args a;
    memset(&a, 0, sizeof a);
    if (!path || set_dims(&a, dims, items, chunk, softplus) < 0) return NULL;
    const int64_t nd = a.n * a.dp, n_states = a.b * ((a.L + chunk - 1) / chunk) * nd;
    /* name, ndim, rows are states, writable, optional, count (flat ones) */
    const struct spec inputs[8] = {
        {"u", 3, 0, 0, 0, 0}, {"delta", 3, 0, 0, 0, 0}, {"z", 3, 0, 0, 1, 0},     {"B", 3, 1, 0, 0, 0},
        {"C", 3, 1, 0, 0, 0}, {"A", 0, 0, 0, 0, nd},    {"D", 0, 0, 0, 0, a.dp}, {"bias", 0, 0, 0, 0, a.dp},
    };
    void *input_out[8] = {&a.u, &a.delta, &a.z, &a.B, &a.C, (void *)&a.A, (void *)&a.D, (void *)&a.bias};
    const struct spec forward_specs[2] = {{"y", 3, 0, 1, 0, 0}, {"states", 0, 0, 1, 1, n_states}};
    void *forward_out[2] = {&a.y, &a.states};
    const struct spec backward_specs[10] = {
        {"states", 0, 0, 0, 0, n_states}, {"gy", 3, 0, 0, 0, 0}, {"gu", 3, 0, 1, 0, 0},   {"gdelta", 3, 0, 1, 0, 0},
        {"gz", 3, 0, 1, 1, 0},            {"gB", 3, 1, 1, 0, 0}, {"gC", 3, 1, 1, 0, 0},   {"gA", 0, 0, 1, 0, nd},
        {"gD", 0, 0, 1, 0, a.dp},         {"gbias", 0, 0, 1, 0, a.dp},
    };
    void *backward_out[10] = {&a.states, &a.gy, &a.gu, &a.gdelta, &a.gz, &a.gB, &a.gC, &a.gA, &a.gD, &a.gbias};
    const int n_outputs = backward ? 10 : 2;
    if (PyTuple_GET_SIZE(objs) != 8 + n_outputs) {
        PyErr_Format(PyExc_TypeError, "expected a tuple of %d buffers", 8 + n_outputs);
        return NULL;
    }
    struct buffers bufs = {.held = 0};
    PyObject *result = NULL, *head = PyTuple_GetSlice(objs, 0, 8), *tail = PyTuple_GetSlice(objs, 8, 8 + n_outputs);
    if (!head || !tail || get_arguments(&bufs, head, inputs, 8, &a, input_out) < 0 ||
        get_arguments(&bufs, tail, backward ? backward_specs : forward_specs, n_outputs, &a,
                      backward ? backward_out : forward_out) < 0)
        goto done;
    if (backward && (a.z.p == NULL) != (a.gz.p == NULL)) {
        PyErr_SetString(PyExc_ValueError, "gz must be given exactly when z is");
        goto done;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = backward ? path->backward(&a) : path->forward(&a);
    Py_END_ALLOW_THREADS
    if (failed)
        PyErr_NoMemory();
    else
        result = Py_NewRef(Py_None);
done:
    Py_XDECREF(head);
    Py_XDECREF(tail);
    release(&bufs);
    return result;
}

PyDoc_STRVAR(forward_doc,
             "forward((u, delta, z, B, C, A, D, bias, y, states), (b, L, d, n), (i0, i1, g0, g1), chunk, softplus,"
             " path)\n--\n\n"
             "Scan batch rows [i0, i1) x channels [16 g0, 16 g1) into y (and, unless None, the chunk states\n"
             "the backward needs). Shapes and layouts: struct scan_args in _selective_scan.c. Releases the GIL.");

static PyObject *py_forward(PyObject *self, PyObject *args) {
    (void)self;
    return run(args, 0);
}

PyDoc_STRVAR(backward_doc,
             "backward((u, delta, z, B, C, A, D, bias, states, gy, gu, gdelta, gz, gB, gC, gA, gD, gbias), dims, "
             "items, chunk, softplus, path)\n--\n\n"
             "Gradients of `forward`'s items for output gradient gy: writes gu, gdelta, gz, adds to gB, gC, gA,\n"
             "gD, gbias. Releases the GIL.");

static PyObject *py_backward(PyObject *self, PyObject *args) {
    (void)self;
    return run(args, 1);
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
