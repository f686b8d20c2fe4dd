/* tasks._scan_fp16: the fused search scan over fp16 index rows, as a CPython extension module.
 *
 * Built when the package is installed (setup.py, an optional extension: without a C compiler the install
 * still succeeds and tasks/scan.py searches with its matrix-product kernel). Nothing is compiled at run time.
 *
 * For each video (n_rows = n_clips + 1 vectors of d halves, clips first, pooled last) and query (d floats):
 *   score = clip_w * max_c cos(clip_c, q) + video_w * cos(pooled, q),   best = argmax_c (first on ties)
 * Halves are widened in registers and accumulated in fp32, so the index is read once at its stored size.
 * One query: four parts of the block are scored side by side, so the hardware prefetchers keep four streams
 * in flight and the four sums are independent FMA chains; a single query then reads at memory speed.
 * Several queries: the scan becomes compute-bound, so a video's rows are scored TILE_ROWS at a time against
 * TILE_QUERIES queries per pass with every product accumulated in registers (a small matrix product:
 * TILE_ROWS + TILE_QUERIES loads feed TILE_ROWS * TILE_QUERIES FMAs), and the next video is prefetched while
 * the FMAs run, so the memory reads overlap the arithmetic. Both compute each cosine as the same sum, so a
 * query's scores do not depend on what it is batched with. The loops are in _scan_fp16_loops.h, included
 * once per path.
 *
 * The module is built for the baseline of its architecture (no -march=native), so one build serves every CPU
 * of that architecture: the vector path is compiled for its instruction set with a target attribute and
 * chosen at run time from what the CPU reports - AVX2 + F16C + FMA, else portable C (also the only path on
 * ARM and other architectures, which the compiler vectorises for the baseline there).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_X86_PATHS 1
#endif

/* IEEE half -> float. ARM converts in hardware through _Float16; elsewhere by bits, exact for every input. */
static inline float half_to_float(uint16_t h) {
#if defined(__aarch64__) && defined(__FLT16_MAX__)
    _Float16 x;
    memcpy(&x, &h, sizeof x);
    return (float)x;
#else
    /* arithmetic only (no branches), so the loops below still vectorise on the architecture's baseline */
    uint32_t magnitude = (uint32_t)(h & 0x7fffu) << 13, exponent = magnitude & 0x0f800000u, subnormal;
    /* normal: rebias the exponent 15 -> 127; inf and NaN (exponent all ones): once more, to 255 */
    uint32_t normal = magnitude + (112u << 23) + (uint32_t)(exponent == 0x0f800000u) * (112u << 23);
    float tiny = (float)(h & 0x3ffu) * 0x1p-24f; /* zero or subnormal: mantissa * 2^-24, exact in fp32 */
    memcpy(&subnormal, &tiny, sizeof subnormal);
    uint32_t is_tiny = 0u - (uint32_t)(exponent == 0);
    uint32_t bits = (normal & ~is_tiny) | (subnormal & is_tiny);
    bits |= (uint32_t)(h & 0x8000u) << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
#endif
}

/* ---- the one sum every score is ----
 * A cosine is the products of a row and a query accumulated eight lanes wide in k order, the eight lanes then
 * reduced in one fixed order, then the last d % 8 products. Every loop below computes exactly this sum for each
 * (row, query), whatever it is batched with: so a query gets the same bits alone, in a batch of 64 or in any
 * tile position, and a search result does not depend on what else the server was asked at the same time.
 * (The two paths round differently from each other: the portable one multiplies and adds, AVX2 fuses.) */

/* The portable path: eight independent sums, which the compiler keeps in vector registers (SSE2, NEON)
 * without -ffast-math. */
static inline float dot_portable(const uint16_t *row, const float *q, int64_t d) {
    float acc[8] = {0};
    int64_t k = 0;
    for (; k + 8 <= d; k += 8)
        for (int j = 0; j < 8; j++) acc[j] += half_to_float(row[k + j]) * q[k + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; k < d; k++) s += half_to_float(row[k]) * q[k];
    return s;
}

#define MAX_TILE_ROWS 4 /* STREAMS rows of one query; several queries: TILE_ROWS */
#define TILE_ROWS 3
#define TILE_QUERIES 4
#define STREAMS 4

/* out[r * stride + b] = rows[r] . q[b] for r < nr, b < nt (nr <= MAX_TILE_ROWS, nt <= TILE_QUERIES), with
 * always constant nr and nt at the call sites below, so the loops unroll completely and the accumulators stay
 * in registers. */
static inline __attribute__((always_inline)) void tile_portable(const uint16_t *const *rows, const float *q,
                                                                int64_t d, float *out, int64_t stride,
                                                                const int nr, const int nt) {
    for (int r = 0; r < nr; r++)
        for (int b = 0; b < nt; b++) out[r * stride + b] = dot_portable(rows[r], q + b * d, d);
}

#ifdef HAVE_X86_PATHS
#define AVX2 __attribute__((target("avx2,f16c,fma")))

AVX2 static inline float hsum_avx2(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* The last d % 8 products of a row, out of line: inlined, its constants would be hoisted into vector
 * registers that the tile below needs for its accumulators (and the tile would spill them). */
__attribute__((noinline)) static float dot_tail(const uint16_t *row, const float *q, int64_t n) {
    float s = 0.0f;
    for (int64_t j = 0; j < n; j++) s += half_to_float(row[j]) * q[j];
    return s;
}

/* NR x NT accumulators in registers (3 x 4: 7 loads feed 12 FMAs), halves widened as they are loaded. */
AVX2 static inline __attribute__((always_inline)) void tile_avx2(const uint16_t *const *rows, const float *q,
                                                                 int64_t d, float *out, int64_t stride,
                                                                 const int NR, const int NT) {
    __m256 acc[MAX_TILE_ROWS][TILE_QUERIES];
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NT; b++) acc[r][b] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) {
        __m256 x[MAX_TILE_ROWS];
        for (int r = 0; r < NR; r++) x[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rows[r] + k)));
        for (int b = 0; b < NT; b++) {
            __m256 y = _mm256_loadu_ps(q + b * d + k);
            for (int r = 0; r < NR; r++) acc[r][b] = _mm256_fmadd_ps(x[r], y, acc[r][b]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NT; b++) {
            float sum = hsum_avx2(acc[r][b]);
            out[r * stride + b] = k < d ? sum + dot_tail(rows[r] + k, q + b * d + k, d - k) : sum;
        }
}
#endif

struct scan_args {
    const uint16_t *rows; /* (m, n_rows, d) halves */
    const float *queries; /* (nq, d) */
    float *scores;        /* (nq, m) */
    int64_t *best;        /* (nq, m) */
    int64_t m, n_rows, d, nq;
    float clip_w, video_w;
    float *sims; /* scratch, n_rows * nq floats: one video's cosines, row-major (several queries only) */
};

/* The loops, once per path (tasks/_scan_fp16_loops.h). AVX-512 CPUs take the AVX2 path: a 512-bit path would
 * have to give the same bits as this one for the batch invariance above, and the one query it sped up is
 * memory-bound anyway. */
#define SUFFIX portable
#define TARGET
#define TILE tile_portable
#include "_scan_fp16_loops.h"
#undef SUFFIX
#undef TARGET
#undef TILE
#ifdef HAVE_X86_PATHS
#define SUFFIX avx2
#define TARGET AVX2
#define TILE tile_avx2
#include "_scan_fp16_loops.h"
#undef SUFFIX
#undef TARGET
#undef TILE
#endif

struct path {
    const char *name;
    void (*scan)(const struct scan_args *);
    int supported; /* set once at import from the CPU's feature bits */
};

static struct path paths[] = { /* best first */
#ifdef HAVE_X86_PATHS
    {"avx2", scan_avx2, 0},
#endif
    {"portable", scan_portable, 1},
};
#define N_PATHS ((Py_ssize_t)(sizeof paths / sizeof paths[0]))

static void detect_cpu(void) {
#ifdef HAVE_X86_PATHS
    __builtin_cpu_init(); /* also checks that the OS saves the wide registers (XCR0) */
    paths[0].supported =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
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

/* Items of `itemsize` bytes with struct code one of `codes`, `count` of them, or any multiple of `unit` when
 * count < 0. (PyObject_GetBuffer has already checked that the buffer is C-contiguous.) */
static int check_buffer(const Py_buffer *buf, const char *what, const char *codes, Py_ssize_t itemsize,
                        int64_t count, int64_t unit) {
    const char *fmt = buf->format ? buf->format : "B";
    if (*fmt == '<' || *fmt == '=' || *fmt == '@') fmt++;
    if (buf->itemsize != itemsize || strlen(fmt) != 1 || !strchr(codes, *fmt)) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of format '%s' and %zd bytes, got '%s' of %zd",
                     what, codes, itemsize, buf->format ? buf->format : "B", buf->itemsize);
        return -1;
    }
    Py_ssize_t items = buf->len / itemsize;
    if (count >= 0 && items != count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %lld items, got %zd", what, (long long)count, items);
        return -1;
    }
    if (count < 0 && items % unit) {
        PyErr_Format(PyExc_ValueError, "%s: %zd items are not a whole number of %lld", what, items,
                     (long long)unit);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(scan_doc,
             "scan(rows, n_rows, d, queries, clip_w, video_w, scores, best, path)\n--\n\n"
             "Scores C-contiguous buffers - rows: m*n_rows*d float16, queries: nq*d float32 - into scores\n"
             "(nq*m float32) and best clips (nq*m int64) with the named path (one of paths()).\n"
             "Releases the GIL while it runs.");

static PyObject *py_scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *objs[4]; /* rows, queries, scores, best */
    long long n_rows, d;
    float clip_w, video_w;
    const char *name;
    if (!PyArg_ParseTuple(args, "OLLOffOOs", &objs[0], &n_rows, &d, &objs[1], &clip_w, &video_w, &objs[2],
                          &objs[3], &name))
        return NULL;
    const struct path *path = NULL;
    for (Py_ssize_t i = 0; i < N_PATHS; i++)
        if (!strcmp(paths[i].name, name)) path = &paths[i];
    if (!path || !path->supported)
        return PyErr_Format(PyExc_ValueError, "fused scan path '%s' is %s", name,
                            path ? "not supported by this CPU" : "unknown");
    if (n_rows < 1 || d < 1) return PyErr_Format(PyExc_ValueError, "n_rows and d must be positive");

    Py_buffer bufs[4];
    int held = 0;
    PyObject *result = NULL;
    struct scan_args a = {.n_rows = n_rows, .d = d, .clip_w = clip_w, .video_w = video_w};
    for (; held < 4; held++) {
        int writable = held >= 2 ? PyBUF_WRITABLE : 0;
        if (PyObject_GetBuffer(objs[held], &bufs[held], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | writable) < 0)
            goto done;
    }
    const int64_t row_halves = (int64_t)n_rows * d;
    if (check_buffer(&bufs[0], "rows", "e", 2, -1, row_halves) < 0 ||
        check_buffer(&bufs[1], "queries", "f", 4, -1, d) < 0)
        goto done;
    const int64_t m = bufs[0].len / 2 / row_halves, nq = bufs[1].len / 4 / d;
    if (check_buffer(&bufs[2], "scores", "f", 4, nq * m, 1) < 0 ||
        check_buffer(&bufs[3], "best", "ql", 8, nq * m, 1) < 0)
        goto done;
    a.rows = bufs[0].buf, a.queries = bufs[1].buf, a.scores = bufs[2].buf, a.best = bufs[3].buf;
    a.m = m, a.nq = nq;
    if (nq > 1) {
        a.sims = PyMem_RawMalloc((size_t)(n_rows * nq) * sizeof(float));
        if (!a.sims) {
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    path->scan(&a);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(a.sims);
    while (held-- > 0) PyBuffer_Release(&bufs[held]);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_VARARGS, scan_doc},
    {"paths", py_paths, METH_NOARGS, "paths()\n--\n\nThe scan paths this CPU supports, best first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_scan_fp16",
    .m_doc = "Fused fp16 search scan with run-time CPU dispatch.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__scan_fp16(void) {
    detect_cpu();
    return PyModule_Create(&module);
}
