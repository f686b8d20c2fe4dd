/* Fused search scan over fp16 index rows (compiled and loaded by tasks/scan.py on first use).
 *
 * For each video (n_rows = n_clips + 1 vectors of d halves, clips first, pooled last) and each query (d floats):
 *   score = clip_w * max_c cos(clip_c, q) + video_w * cos(pooled, q),   best = argmax_c (first on ties)
 * Halves are widened in registers and accumulated in fp32, so the index is read once at its stored size;
 * four independent accumulators keep the FMA chain from limiting a single core below memory speed. All of a
 * video's queries run while its rows are in L1. Platforms without an fp16 vector path refuse to compile, and
 * the caller falls back to its matrix-product kernel.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
#define ZERO() _mm512_setzero_ps()
#define LOAD_HALF(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD(p) _mm512_loadu_ps(p)
#define FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define ADD(a, b) _mm512_add_ps(a, b)
#define HSUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
#define ZERO() _mm256_setzero_ps()
#define LOAD_HALF(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD(p) _mm256_loadu_ps(p)
#define FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define ADD(a, b) _mm256_add_ps(a, b)
static inline float HSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#error "no fp16 vector path for this CPU (needs AVX-512F, or AVX2 + F16C + FMA)"
#endif

static inline float dot(const uint16_t *row, const float *q, int64_t d) {
    vec a0 = ZERO(), a1 = ZERO(), a2 = ZERO(), a3 = ZERO();
    int64_t k = 0;
    for (; k + 4 * LANES <= d; k += 4 * LANES) {
        a0 = FMA(LOAD_HALF(row + k), LOAD(q + k), a0);
        a1 = FMA(LOAD_HALF(row + k + LANES), LOAD(q + k + LANES), a1);
        a2 = FMA(LOAD_HALF(row + k + 2 * LANES), LOAD(q + k + 2 * LANES), a2);
        a3 = FMA(LOAD_HALF(row + k + 3 * LANES), LOAD(q + k + 3 * LANES), a3);
    }
    for (; k + LANES <= d; k += LANES) a0 = FMA(LOAD_HALF(row + k), LOAD(q + k), a0);
    float s = HSUM(ADD(ADD(a0, a1), ADD(a2, a3)));
    for (; k < d; k++) s += _cvtsh_ss(row[k]) * q[k];
    return s;
}

/* rows: (m, n_rows, d) halves; queries: (nq, d) floats; scores, best: (nq, m), row-major. */
void scan_fp16(const uint16_t *rows, int64_t m, int64_t n_rows, int64_t d, const float *queries, int64_t nq,
               float clip_w, float video_w, float *scores, int64_t *best) {
    for (int64_t v = 0; v < m; v++) {
        const uint16_t *video = rows + v * n_rows * d;
        for (int64_t b = 0; b < nq; b++) {
            const float *q = queries + b * d;
            float top = -INFINITY;
            int64_t arg = 0;
            for (int64_t c = 0; c + 1 < n_rows; c++) {
                float s = dot(video + c * d, q, d);
                if (s > top) {
                    top = s;
                    arg = c;
                }
            }
            scores[b * m + v] = clip_w * top + video_w * dot(video + (n_rows - 1) * d, q, d);
            best[b * m + v] = arg;
        }
    }
}
