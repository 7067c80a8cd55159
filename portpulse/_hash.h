/* Shared by the C extensions that intern byte strings in hash tables (ingest/_lineproto.c: the
 * line-protocol heads; portpulse/codecs/_records.c: a fetch's record keys and value headers). */
#ifndef PORTPULSE_HASH_H
#define PORTPULSE_HASH_H

#include <stdint.h>
#include <string.h>

/* A hash of p[0:n], a word at a time, from ``seed``. Not a cryptographic hash: a spread for open
 * addressing, whose tables compare equal-hashed keys byte for byte. */
static inline uint64_t hash_bytes(const unsigned char *p, int64_t n, uint64_t seed) {
    uint64_t h = seed ^ ((uint64_t)n * 0x9E3779B97F4A7C15ULL);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, (size_t)n);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 29);
}

#endif
