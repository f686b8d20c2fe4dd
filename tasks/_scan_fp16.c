/* tasks._scan_fp16: the fused search scan over fp16 index rows, as a CPython extension module.
 *
 * Built when the package is installed (setup.py, an optional extension: without a C compiler the install
 * still succeeds and tasks/scan.py searches with its matrix-product kernel). Nothing is compiled at run time.
 *
 * For each video (n_rows = n_clips + 1 vectors of d halves, clips first, pooled last) and query (d floats):
 *   score = clip_w * max_c cos(clip_c, q) + video_w * cos(pooled, q),   best = argmax_c (first on ties)
 * Halves are widened in registers and accumulated in fp32, so the index is read once at its stored size.
 * One query: independent accumulators keep the FMA chain from limiting a single core below memory speed.
 * Several queries: the scan becomes compute-bound, so a video's rows are scored TILE_ROWS at a time against
 * TILE_QUERIES queries per pass with every product accumulated in registers (a small matrix product:
 * TILE_ROWS + TILE_QUERIES loads feed TILE_ROWS * TILE_QUERIES FMAs), and the next video is prefetched while
 * the FMAs run, so the memory reads overlap the arithmetic. (Widening each row once into an fp32 buffer
 * instead measured slower up to 16 queries, the serving batch sizes; BENCHMARKS.md.)
 *
 * The module is built for the baseline of its architecture (no -march=native), so one build serves every CPU
 * of that architecture: each vector path is compiled for its own instruction set with a target attribute and
 * chosen at run time from what the CPU reports - AVX-512F, else AVX2 + F16C + FMA, else portable C (also the
 * only path on ARM and other architectures, which the compiler vectorises for the baseline there).
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

typedef float (*dot_fn)(const uint16_t *row, const float *q, int64_t d);

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

/* Eight independent sums, which the compiler keeps in vector registers (SSE2, NEON) without -ffast-math. */
static inline float dot_portable(const uint16_t *row, const float *q, int64_t d) {
    float acc[8] = {0};
    int64_t k = 0;
    for (; k + 8 <= d; k += 8)
        for (int j = 0; j < 8; j++) acc[j] += half_to_float(row[k + j]) * q[k + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; k < d; k++) s += half_to_float(row[k]) * q[k];
    return s;
}

#ifdef HAVE_X86_PATHS
#define AVX512 __attribute__((target("avx512f,avx2,f16c,fma")))
#define AVX2 __attribute__((target("avx2,f16c,fma")))

AVX512 static inline float dot_avx512(const uint16_t *row, const float *q, int64_t d) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define H16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
    int64_t k = 0;
    for (; k + 64 <= d; k += 64) {
        a0 = _mm512_fmadd_ps(H16(row + k), _mm512_loadu_ps(q + k), a0);
        a1 = _mm512_fmadd_ps(H16(row + k + 16), _mm512_loadu_ps(q + k + 16), a1);
        a2 = _mm512_fmadd_ps(H16(row + k + 32), _mm512_loadu_ps(q + k + 32), a2);
        a3 = _mm512_fmadd_ps(H16(row + k + 48), _mm512_loadu_ps(q + k + 48), a3);
    }
    for (; k + 16 <= d; k += 16) a0 = _mm512_fmadd_ps(H16(row + k), _mm512_loadu_ps(q + k), a0);
#undef H16
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < d; k++) s += half_to_float(row[k]) * q[k];
    return s;
}

AVX2 static inline float dot_avx2(const uint16_t *row, const float *q, int64_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define H8(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
    int64_t k = 0;
    for (; k + 32 <= d; k += 32) {
        a0 = _mm256_fmadd_ps(H8(row + k), _mm256_loadu_ps(q + k), a0);
        a1 = _mm256_fmadd_ps(H8(row + k + 8), _mm256_loadu_ps(q + k + 8), a1);
        a2 = _mm256_fmadd_ps(H8(row + k + 16), _mm256_loadu_ps(q + k + 16), a2);
        a3 = _mm256_fmadd_ps(H8(row + k + 24), _mm256_loadu_ps(q + k + 24), a3);
    }
    for (; k + 8 <= d; k += 8) a0 = _mm256_fmadd_ps(H8(row + k), _mm256_loadu_ps(q + k), a0);
#undef H8
    __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    float s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    for (; k < d; k++) s += half_to_float(row[k]) * q[k];
    return s;
}
#endif

struct scan_args {
    const uint16_t *rows; /* (m, n_rows, d) halves */
    const float *queries; /* (nq, d) */
    float *scores;        /* (nq, m) */
    int64_t *best;        /* (nq, m) */
    int64_t m, n_rows, d, nq;
    float clip_w, video_w;
    float *scratch; /* TILE_ROWS * d floats (several queries, portable path) */
    float *sims;    /* scratch, n_rows * nq floats: one video's cosines, row-major (several queries only) */
};

/* The loop shared by all paths. Always inlined into each path's entry point with a constant `dot`, which the
 * compiler then inlines too, so every path is one function compiled for its own instruction set. */
static inline __attribute__((always_inline)) void scan_videos(dot_fn dot, const struct scan_args *a) {
    const int64_t m = a->m, n_rows = a->n_rows, d = a->d;
    for (int64_t v = 0; v < m; v++) {
        const uint16_t *video = a->rows + v * n_rows * d;
        for (int64_t b = 0; b < a->nq; b++) {
            const float *q = a->queries + b * d;
            float top = -INFINITY;
            int64_t arg = 0;
            for (int64_t c = 0; c + 1 < n_rows; c++) {
                float s = dot(video + c * d, q, d);
                if (s > top) {
                    top = s;
                    arg = c;
                }
            }
            a->scores[b * m + v] = a->clip_w * top + a->video_w * dot(video + (n_rows - 1) * d, q, d);
            a->best[b * m + v] = arg;
        }
    }
}


/* ---- several queries ---- */
#define TILE_ROWS 3
#define TILE_QUERIES 4

/* out[r * nq + b] = rows[r] . q[b] for r < nr, b < nt (nr <= TILE_ROWS, nt <= TILE_QUERIES); `scratch` holds
 * TILE_ROWS * d floats */
typedef void (*tile_fn)(const uint16_t *rows, int nr, const float *q, int nt, int64_t d, float *out, int64_t nq,
                        float *scratch);

static inline float dot_f32_portable(const float *x, const float *q, int64_t d) {
    float acc[8] = {0};
    int64_t k = 0;
    for (; k + 8 <= d; k += 8)
        for (int j = 0; j < 8; j++) acc[j] += x[k + j] * q[k + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; k < d; k++) s += x[k] * q[k];
    return s;
}

/* widens the rows into scratch, then one fp32 dot per row and query */
static inline void tile_portable(const uint16_t *rows, int nr, const float *q, int nt, int64_t d, float *out,
                                 int64_t nq, float *scratch) {
    for (int64_t k = 0; k < nr * d; k++) scratch[k] = half_to_float(rows[k]);
    for (int r = 0; r < nr; r++)
        for (int b = 0; b < nt; b++) out[r * nq + b] = dot_f32_portable(scratch + r * d, q + b * d, d);
}

#ifdef HAVE_X86_PATHS
AVX2 static inline float hsum_avx2(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* NR x NT accumulators in registers, halves widened as they are loaded; constant NR, NT at every call site, so
 * the loops unroll completely. Four queries' sums leave in one vector (horizontal adds across accumulators). */
AVX2 static inline __attribute__((always_inline)) void tile_avx2_fixed(const uint16_t *rows, const float *q,
                                                                       int64_t d, float *out, int64_t nq,
                                                                       const int NR, const int NT) {
    __m256 acc[TILE_ROWS][TILE_QUERIES];
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NT; b++) acc[r][b] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) {
        __m256 x[TILE_ROWS];
        for (int r = 0; r < NR; r++) x[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rows + r * d + k)));
        for (int b = 0; b < NT; b++) {
            __m256 y = _mm256_loadu_ps(q + b * d + k);
            for (int r = 0; r < NR; r++) acc[r][b] = _mm256_fmadd_ps(x[r], y, acc[r][b]);
        }
    }
    for (int r = 0; r < NR; r++) {
        float sums[TILE_QUERIES];
        if (NT == TILE_QUERIES) {
            __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
            _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        } else
            for (int b = 0; b < NT; b++) sums[b] = hsum_avx2(acc[r][b]);
        for (int b = 0; b < NT; b++) {
            float s = sums[b];
            for (int64_t j = k; j < d; j++) s += half_to_float(rows[r * d + j]) * q[b * d + j];
            out[r * nq + b] = s;
        }
    }
}

#define TILE_CASE(R, T)                                                                                    \
    case (R) * 8 + (T): tile_avx2_fixed(rows, q, d, out, nq, R, T); break;

AVX2 static inline void tile_avx2(const uint16_t *rows, int nr, const float *q, int nt, int64_t d, float *out,
                                  int64_t nq, float *scratch) {
    (void)scratch;
    switch (nr * 8 + nt) {
        TILE_CASE(3, 4) TILE_CASE(3, 3) TILE_CASE(3, 2) TILE_CASE(3, 1)
        TILE_CASE(2, 4) TILE_CASE(2, 3) TILE_CASE(2, 2) TILE_CASE(2, 1)
        TILE_CASE(1, 4) TILE_CASE(1, 3) TILE_CASE(1, 2) TILE_CASE(1, 1)
    }
}
#undef TILE_CASE
#endif

/* Several queries, one video at a time: every cosine into `sims`, then each query's max over clips. */
static inline __attribute__((always_inline)) void scan_videos_multi(tile_fn tile, const struct scan_args *a) {
    const int64_t m = a->m, n_rows = a->n_rows, d = a->d, nq = a->nq;
    for (int64_t v = 0; v < m; v++) {
        const uint16_t *video = a->rows + v * n_rows * d;
        const char *next = (const char *)(video + n_rows * d), *end = (const char *)(a->rows + m * n_rows * d);
        const int64_t lines = (n_rows * d * 2 + 63) / 64, groups = (n_rows + TILE_ROWS - 1) / TILE_ROWS;
        for (int64_t r = 0, line = 0; r < n_rows; r += TILE_ROWS) {
            const int nr = (int)(n_rows - r < TILE_ROWS ? n_rows - r : TILE_ROWS);
            /* the next video's lines, spread over this one's row groups: memory reads overlap the FMAs */
            for (int64_t stop = (r / TILE_ROWS + 1) * lines / groups; line < stop; line++)
                if (next + line * 64 < end) __builtin_prefetch(next + line * 64);
            for (int64_t b = 0; b < nq; b += TILE_QUERIES) {
                const int nt = (int)(nq - b < TILE_QUERIES ? nq - b : TILE_QUERIES);
                tile(video + r * d, nr, a->queries + b * d, nt, d, a->sims + r * nq + b, nq, a->scratch);
            }
        }
        for (int64_t b = 0; b < nq; b++) {
            float top = -INFINITY;
            int64_t arg = 0;
            for (int64_t c = 0; c + 1 < n_rows; c++) {
                float s = a->sims[c * nq + b];
                if (s > top) {
                    top = s;
                    arg = c;
                }
            }
            a->scores[b * m + v] = a->clip_w * top + a->video_w * a->sims[(n_rows - 1) * nq + b];
            a->best[b * m + v] = arg;
        }
    }
}

/* One entry point per path. AVX-512 CPUs run the several-query tile at 256 bits: the AVX2 code, which is what
 * the CPUs this is tested on can check. */
static void scan_portable(const struct scan_args *a) {
    if (a->nq > 1) scan_videos_multi(tile_portable, a);
    else scan_videos(dot_portable, a);
}
#ifdef HAVE_X86_PATHS
AVX512 static void scan_avx512(const struct scan_args *a) {
    if (a->nq > 1) scan_videos_multi(tile_avx2, a);
    else scan_videos(dot_avx512, a);
}
AVX2 static void scan_avx2(const struct scan_args *a) {
    if (a->nq > 1) scan_videos_multi(tile_avx2, a);
    else scan_videos(dot_avx2, a);
}
#endif

struct path {
    const char *name;
    void (*scan)(const struct scan_args *);
    int supported; /* set once at import from the CPU's feature bits */
};

static struct path paths[] = { /* best first */
#ifdef HAVE_X86_PATHS
    {"avx512", scan_avx512, 0},
    {"avx2", scan_avx2, 0},
#endif
    {"portable", scan_portable, 1},
};
#define N_PATHS ((Py_ssize_t)(sizeof paths / sizeof paths[0]))

static void detect_cpu(void) {
#ifdef HAVE_X86_PATHS
    __builtin_cpu_init(); /* also checks that the OS saves the wide registers (XCR0) */
    const int avx2 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    paths[0].supported = __builtin_cpu_supports("avx512f") && avx2;
    paths[1].supported = avx2;
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
        a.scratch = PyMem_RawMalloc((size_t)(TILE_ROWS * d) * sizeof(float));
        a.sims = PyMem_RawMalloc((size_t)(n_rows * nq) * sizeof(float));
        if (!a.scratch || !a.sims) {
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    path->scan(&a);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(a.scratch);
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
