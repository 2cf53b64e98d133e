/* Vision rotary embedding in one pass, bit-identical to the reference's fp32 formula:
 *
 *   out = bf16( fp32(x) * cos + rotate_half(fp32(x)) * sin ),  rotate_half([a | b]) = [-b | a]
 *
 *   x    (N, H, D) bf16, a strided view (row stride sn, head stride sh; D contiguous): q or k
 *                  straight out of the fused qkv projection
 *   cos, sin (N, D) fp32, contiguous
 *   out  (N, H, D) bf16, contiguous
 *
 * The reference runs ~8 separate torch ops per tensor (widen, mul, neg, cat, mul, add, narrow), each a
 * pass over an fp32 copy; here each element is read and written once. Every step is the same IEEE
 * fp32 operation in the same order (two products, one sum, one rounding to bf16), so the result is
 * the same bit for bit; this file must be built with -ffp-contract=off so that the product and the
 * sum are not fused into an FMA (build.py passes it). */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

void rotary_bf16(const uint16_t* x, int64_t sn, int64_t sh, const float* cos, const float* sin, uint16_t* out,
                 int64_t N, int64_t H, int64_t D) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float* c = cos + n * D;
        const float* s = sin + n * D;
        for (int64_t h = 0; h < H; h++) {
            const uint16_t* xi = x + n * sn + h * sh;
            uint16_t* o = out + (n * H + h) * D;
            for (int64_t d = 0; d < half; d++) {
                float a = bf16_to_f32(xi[d]), b = bf16_to_f32(xi[d + half]);
                float lo = a * c[d] + (-b) * s[d];
                float hi = b * c[d + half] + a * s[d + half];
                o[d] = f32_to_bf16(lo);
                o[d + half] = f32_to_bf16(hi);
            }
        }
    }
}
