/* Weight-only int8 linear for a few activation rows (decode): y = (x @ q.T) * scale + bias.
 *
 *   x     (M, K)  fp32 or bf16 (x_bf16), rows contiguous
 *   q     (N, K)  int8, rows contiguous; the per-output-channel weights
 *   scale (N,)    fp32
 *   bias  (N,)    same dtype as x, or NULL
 *   y     (M, N)  same dtype as x
 *
 * Decode is memory-bound: each weight byte is read once per call, so the work is organised around
 * streaming q. The N rows are split into one contiguous block per OpenMP thread; a thread walks its
 * block row by row, which is one sequential stream of bytes, and prefetches that stream twice
 * ahead (PF_NEAR bytes into L1, PF_FAR into L3): with hardware prefetching alone a 2-core Xeon read
 * ~16 GB/s, with both hints ~25 GB/s (a plain sum over the same bytes: ~28 GB/s).
 *
 * Numerics: int8 -> fp32 exactly, products and sums in fp32 (4 or 16 partial sums per row, then a
 * tree), then * scale, + bias, and one rounding to bf16 (nearest-even) when y is bf16.
 *
 * OpenMP: built with -fopenmp and loaded after torch, so `libgomp.so.1` is torch's own runtime and
 * both share one thread pool (torch.set_num_threads applies here too). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PF_NEAR 1024
#define PF_FAR 8192
#define MAX_TILE 4 /* activation rows per pass over a weight row */

static inline void prefetch(const int8_t* p, const int8_t* end) {
    if (p + PF_NEAR < end) __builtin_prefetch(p + PF_NEAR, 0, 3);
    if (p + PF_FAR < end) __builtin_prefetch(p + PF_FAR, 0, 1);
}

#if defined(__AVX512F__)
static inline __m512 load_q16(const int8_t* q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q)));
}

/* out[m] = sum_k x[m, k] * r[k] for m < mt (mt <= MAX_TILE); x rows are K floats apart */
static void row_dots(const float* x, int mt, const int8_t* r, int64_t K, const int8_t* end, float* out) {
    int64_t k = 0;
    if (mt == 1) { /* the decode case: 4 independent accumulators hide the FMA latency */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (; k + 64 <= K; k += 64) {
            prefetch(r + k, end);
            a0 = _mm512_fmadd_ps(load_q16(r + k), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(load_q16(r + k + 16), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(load_q16(r + k + 32), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(load_q16(r + k + 48), _mm512_loadu_ps(x + k + 48), a3);
        }
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (; k < K; k++) s += x[k] * (float)r[k];
        out[0] = s;
        return;
    }
    __m512 acc[MAX_TILE];
    for (int m = 0; m < MAX_TILE; m++) acc[m] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        if ((k & 63) == 0) prefetch(r + k, end);
        __m512 w = load_q16(r + k);
        for (int m = 0; m < mt; m++) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < mt; m++) {
        float s = _mm512_reduce_add_ps(acc[m]);
        for (int64_t j = k; j < K; j++) s += x[m * K + j] * (float)r[j];
        out[m] = s;
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline __m256 load_q8(const int8_t* q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)q)));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* as the AVX-512 version, 8 lanes wide: out[m] = sum_k x[m, k] * r[k] for m < mt */
static void row_dots(const float* x, int mt, const int8_t* r, int64_t K, const int8_t* end, float* out) {
    for (int m = 0; m < mt; m++) {
        const float* xm = x + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            if (m == 0 && (k & 63) == 0) prefetch(r + k, end);
            a0 = _mm256_fmadd_ps(load_q8(r + k), _mm256_loadu_ps(xm + k), a0);
            a1 = _mm256_fmadd_ps(load_q8(r + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
            a2 = _mm256_fmadd_ps(load_q8(r + k + 16), _mm256_loadu_ps(xm + k + 16), a2);
            a3 = _mm256_fmadd_ps(load_q8(r + k + 24), _mm256_loadu_ps(xm + k + 24), a3);
        }
        float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; k < K; k++) s += xm[k] * (float)r[k];
        out[m] = s;
    }
}
#else
/* portable: the compiler vectorises the reduction for the target it is built for (-march=native) */
static void row_dots(const float* x, int mt, const int8_t* r, int64_t K, const int8_t* end, float* out) {
    for (int m = 0; m < mt; m++) {
        const float* xm = x + m * K;
        float s = 0.f;
        for (int64_t k0 = 0; k0 < K; k0 += 256) {
            int64_t k1 = k0 + 256 < K ? k0 + 256 : K;
            if (m == 0) prefetch(r + k0, end);
#pragma omp simd reduction(+ : s)
            for (int64_t k = k0; k < k1; k++) s += xm[k] * (float)r[k];
        }
        out[m] = s;
    }
}
#endif

/* 1 when row_dots is hand-vectorised for this build (AVX-512 or AVX2+FMA): only then does q8_linear beat
 * torch's int8 kernel (the portable loop measured ~1.4x slower than it), so callers use it only then. */
int q8_linear_vectorised(void) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
    return 1;
#else
    return 0;
#endif
}

/* Returns 0, or -1 when the fp32 copy of a bf16 x could not be allocated. */
int q8_linear(const void* x, int x_bf16, const int8_t* q, const float* scale, const void* bias, void* y,
              int64_t M, int64_t N, int64_t K) {
    const float* xf = (const float*)x;
    float* xbuf = NULL;
    if (x_bf16) { /* widen once; M*K is small (a few rows) */
        xbuf = (float*)malloc((size_t)(M * K) * sizeof(float));
        if (xbuf == NULL) return -1;
        const uint16_t* xh = (const uint16_t*)x;
        for (int64_t i = 0; i < M * K; i++) xbuf[i] = bf16_to_f32(xh[i]);
        xf = xbuf;
    }
#pragma omp parallel
    {
        int64_t nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        int64_t lo = N * t / nt, hi = N * (t + 1) / nt;
        const int8_t* end = q + hi * K; /* this thread's stream ends here: no prefetch past it */
        float dots[MAX_TILE];
        for (int64_t n = lo; n < hi; n++) {
            const int8_t* r = q + n * K;
            float b = 0.f;
            if (bias != NULL) b = x_bf16 ? bf16_to_f32(((const uint16_t*)bias)[n]) : ((const float*)bias)[n];
            for (int64_t m0 = 0; m0 < M; m0 += MAX_TILE) {
                int mt = (int)(M - m0 < MAX_TILE ? M - m0 : MAX_TILE);
                row_dots(xf + m0 * K, mt, r, K, end, dots);
                for (int m = 0; m < mt; m++) {
                    float v = dots[m] * scale[n] + b;
                    if (x_bf16) ((uint16_t*)y)[(m0 + m) * N + n] = f32_to_bf16(v);
                    else ((float*)y)[(m0 + m) * N + n] = v;
                }
            }
        }
    }
    free(xbuf);
    return 0;
}

/* w (N, K) = q * scale[n], as bf16 (w_bf16, rounded to nearest-even) or fp32: the dequantised weight
 * for many-row calls (prefill), which then run a dense GEMM. Callers pass a block of rows at a time,
 * small enough to stay in cache until the GEMM reads it. Values are finite (|q| <= 127, scale finite),
 * so the rounding needs no NaN case and vectorises. */
void q8_dequantize(const int8_t* q, const float* scale, void* w, int w_bf16, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* r = q + n * K;
        const float s = scale[n];
        if (w_bf16) {
            uint16_t* out = (uint16_t*)w + n * K;
#pragma omp simd
            for (int64_t k = 0; k < K; k++) {
                float v = (float)r[k] * s;
                uint32_t u;
                memcpy(&u, &v, 4);
                out[k] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            }
        } else {
            float* out = (float*)w + n * K;
#pragma omp simd
            for (int64_t k = 0; k < K; k++) out[k] = (float)r[k] * s;
        }
    }
}
