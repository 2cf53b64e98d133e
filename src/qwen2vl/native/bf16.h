/* bf16 <-> fp32 for the kernels in this folder (included by them; build.py hashes it with each source).
 * bf16 is the top half of an fp32: widening is exact; narrowing rounds to nearest, ties to even, as
 * torch's .to(torch.bfloat16) does, and keeps NaN a (quiet) NaN. */
#ifndef QWEN2VL_BF16_H
#define QWEN2VL_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                        /* nearest, ties to even */
    return (uint16_t)(u >> 16);
}

#endif
