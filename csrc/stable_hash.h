/* The stable hash of byte strings that closure indexes are built with.
 *
 * It must give the same value in every process and every run (unlike
 * Python's seeded hash()), so it is part of the blob format: changing it
 * means bumping FORMAT_VERSION in pyshm/_codec.pyx.  The construction is
 * wyhash's (final version 4): one 64x64->128 multiply per 16 bytes, with
 * short inputs read as overlapping fixed-size words (no variable memcpy). */
#ifndef PYSHM_STABLE_HASH_H
#define PYSHM_STABLE_HASH_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PYSHM_WY0 0xa0761d6478bd642full
#define PYSHM_WY1 0xe7037ed1a0b428dbull

static inline void pyshm_mum(uint64_t *a, uint64_t *b) {
    __uint128_t r = (__uint128_t)*a * *b;
    *a = (uint64_t)r;
    *b = (uint64_t)(r >> 64);
}

static inline uint64_t pyshm_mix(uint64_t a, uint64_t b) {
    pyshm_mum(&a, &b);
    return a ^ b;
}

static inline uint64_t pyshm_rd8(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint64_t pyshm_rd4(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static inline uint64_t pyshm_hash_bytes(const void *data, size_t n, uint64_t seed) {
    const uint8_t *p = (const uint8_t *)data;
    uint64_t a, b;
    seed ^= pyshm_mix(seed ^ PYSHM_WY0, PYSHM_WY1);
    if (n <= 16) {
        if (n >= 4) {
            size_t mid = (n >> 3) << 2;   /* 0 for 4..7 bytes, 4 for 8..16 */
            a = (pyshm_rd4(p) << 32) | pyshm_rd4(p + mid);
            b = (pyshm_rd4(p + n - 4) << 32) | pyshm_rd4(p + n - 4 - mid);
        } else if (n > 0) {
            a = ((uint64_t)p[0] << 16) | ((uint64_t)p[n >> 1] << 8) | p[n - 1];
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        size_t i = n;
        while (i > 16) {
            seed = pyshm_mix(pyshm_rd8(p) ^ PYSHM_WY1, pyshm_rd8(p + 8) ^ seed);
            p += 16;
            i -= 16;
        }
        /* The last 16 bytes, overlapping the loop's when i < 16. */
        a = pyshm_rd8(p + i - 16);
        b = pyshm_rd8(p + i - 8);
    }
    a ^= PYSHM_WY1;
    b ^= seed;
    pyshm_mum(&a, &b);
    return pyshm_mix(a ^ PYSHM_WY0 ^ n, b ^ PYSHM_WY1);
}

#endif
