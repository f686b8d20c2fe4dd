/* The scan loops of one code path, included by _scan_fp16.c once per path with
 *   SUFFIX  the path's name, appended to every function defined here,
 *   TARGET  the path's target attribute (empty for the portable path),
 *   TILE(rows, q, d, out, stride, nr, nt)  the path's tile (always inlined, constant nr and nt).
 * Everything is always inlined into NAME(scan), the path's entry point, so each path is one function compiled
 * for its own instruction set. */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define NAME(x) CAT(x, SUFFIX)
#define LOOP TARGET static inline __attribute__((always_inline))

/* One query. The block is cut into S parts scored side by side, a video of each in turn, its rows as one
 * tile: each part is a sequential stream for the hardware prefetchers, and several streams keep more reads in
 * flight than one (on one core of the 2-core EPYC test VM: one stream ~0.7 of the fastest read, four ~1.0;
 * BENCHMARKS.md), and the S sums are independent FMA chains. */
LOOP void NAME(score_videos)(const struct scan_args *a, int64_t v, int64_t step, const int S) {
    const int64_t n_rows = a->n_rows, d = a->d;
    const uint16_t *row[STREAMS];
    float sim[STREAMS], top[STREAMS];
    int64_t arg[STREAMS];
    for (int s = 0; s < S; s++) {
        row[s] = a->rows + (v + s * step) * n_rows * d;
        top[s] = -INFINITY;
        arg[s] = 0;
    }
    for (int64_t c = 0; c + 1 < n_rows; c++) {
        TILE(row, a->queries, d, sim, 1, S, 1);
        for (int s = 0; s < S; s++) {
            if (sim[s] > top[s]) {
                top[s] = sim[s];
                arg[s] = c;
            }
            row[s] += d;
        }
    }
    TILE(row, a->queries, d, sim, 1, S, 1); /* the pooled rows */
    for (int s = 0; s < S; s++) {
        a->scores[v + s * step] = a->clip_w * top[s] + a->video_w * sim[s];
        a->best[v + s * step] = arg[s];
    }
}

LOOP void NAME(scan_one_query)(const struct scan_args *a) {
    const int64_t part = a->m / STREAMS;
    for (int64_t v = 0; v < part; v++) NAME(score_videos)(a, v, part, STREAMS);
    for (int64_t v = STREAMS * part; v < a->m; v++) NAME(score_videos)(a, v, 0, 1);
}

#define TILE_CASE(R, T)                                                                                    \
    case (R) * 8 + (T): TILE(rows, q, d, out, stride, R, T); break;

/* rows x queries of any shape up to TILE_ROWS x TILE_QUERIES, as one of the constant-shape tiles */
LOOP void NAME(tile_any)(const uint16_t *const *rows, int nr, const float *q, int nt, int64_t d, float *out,
                         int64_t stride) {
    switch (nr * 8 + nt) {
        TILE_CASE(3, 4) TILE_CASE(3, 3) TILE_CASE(3, 2) TILE_CASE(3, 1)
        TILE_CASE(2, 4) TILE_CASE(2, 3) TILE_CASE(2, 2) TILE_CASE(2, 1)
        TILE_CASE(1, 4) TILE_CASE(1, 3) TILE_CASE(1, 2) TILE_CASE(1, 1)
    }
}
#undef TILE_CASE

/* Several queries: the scan becomes compute-bound, so a video's rows are scored TILE_ROWS at a time against
 * TILE_QUERIES queries per pass, every cosine into `sims`, then each query's max over clips; the next video is
 * prefetched while the FMAs run, so the memory reads overlap the arithmetic. (Widening each row once into an
 * fp32 buffer instead measured slower up to 16 queries, the serving batch sizes; BENCHMARKS.md.) */
LOOP void NAME(scan_queries)(const struct scan_args *a) {
    const int64_t m = a->m, n_rows = a->n_rows, d = a->d, nq = a->nq;
    for (int64_t v = 0; v < m; v++) {
        const uint16_t *video = a->rows + v * n_rows * d;
        const char *next = (const char *)(video + n_rows * d), *end = (const char *)(a->rows + m * n_rows * d);
        const int64_t lines = (n_rows * d * 2 + 63) / 64, groups = (n_rows + TILE_ROWS - 1) / TILE_ROWS;
        for (int64_t r = 0, line = 0; r < n_rows; r += TILE_ROWS) {
            const int nr = (int)(n_rows - r < TILE_ROWS ? n_rows - r : TILE_ROWS);
            const uint16_t *rows[TILE_ROWS];
            for (int i = 0; i < nr; i++) rows[i] = video + (r + i) * d;
            /* the next video's lines, spread over this one's row groups: memory reads overlap the FMAs */
            for (int64_t stop = (r / TILE_ROWS + 1) * lines / groups; line < stop; line++)
                if (next + line * 64 < end) __builtin_prefetch(next + line * 64);
            for (int64_t b = 0; b < nq; b += TILE_QUERIES) {
                const int nt = (int)(nq - b < TILE_QUERIES ? nq - b : TILE_QUERIES);
                NAME(tile_any)(rows, nr, a->queries + b * d, nt, d, a->sims + r * nq + b, nq);
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

TARGET static void NAME(scan)(const struct scan_args *a) {
    if (a->nq > 1) NAME(scan_queries)(a);
    else if (a->nq == 1) NAME(scan_one_query)(a);
}

#undef CAT_
#undef CAT
#undef NAME
#undef LOOP
