/* Number reading for mip/protocol/_jsonnum.pyx: eight octets at a time (SWAR) and the
 * decimal-to-double step of Eisel and Lemire. Plain C, no Python.h.
 *
 * Every 8-octet load here reads exactly p[0..7]: callers check that 8 octets are left. */
#ifndef MIP_JSONNUM_H
#define MIP_JSONNUM_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MIP_OCTETS(c) (0x0101010101010101ULL * (uint64_t)(c))
#define MIP_HIGH_BITS 0x8080808080808080ULL

/* p[0..7] as a little-endian integer: p[0] in the low octet (one load on most machines) */
static inline uint64_t mip_jsonnum_load8(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* The high bit of each octet of v that is 0, and no other bit (no carry between octets). */
static inline uint64_t mip_jsonnum_zero_octets(uint64_t v) {
    return ~(((v & ~MIP_HIGH_BITS) + ~MIP_HIGH_BITS) | v) & MIP_HIGH_BITS;
}

/* Whether all 8 octets are digits, '+', ',', '-', '.' or ' ': what runs of numbers in a
 * numeric array are made of, with nothing that opens or closes a list among them. */
static inline int mip_jsonnum_plain8(uint64_t v) {
    uint64_t low7 = v & ~MIP_HIGH_BITS;
    /* an octet under 0x80: its high bit set in low7 + 0x55 from 0x2B ('+') up, in
     * low7 + 0x46 from 0x3A (past '9') up; no carry leaves an octet */
    uint64_t outside = (~(low7 + MIP_OCTETS(0x55)) | (low7 + MIP_OCTETS(0x46)) | v);
    uint64_t bad = (outside & ~mip_jsonnum_zero_octets(v ^ MIP_OCTETS(0x20)))
                   | mip_jsonnum_zero_octets(v ^ MIP_OCTETS(0x2F));  /* '/' is in the range */
    return (bad & MIP_HIGH_BITS) == 0;
}

#if defined(__SSE2__)
#include <emmintrin.h>
#define MIP_JSONNUM_RUN 16
#else
#define MIP_JSONNUM_RUN 8
#endif

/* Whether p[0 .. MIP_JSONNUM_RUN - 1] are all digits, '+', ',', '-', '.' or ' ' (as
 * mip_jsonnum_plain8): 16 octets a step with SSE2, else 8. */
static inline int mip_jsonnum_plain_run(const unsigned char *p) {
#if defined(__SSE2__)
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m128i from_plus = _mm_sub_epi8(v, _mm_set1_epi8(0x2B));  /* '+' .. '9': 0 .. 14 */
    __m128i in_range = _mm_cmpeq_epi8(_mm_min_epu8(from_plus, _mm_set1_epi8(0x0E)), from_plus);
    __m128i ok = _mm_or_si128(
        _mm_andnot_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8(0x2F)), in_range),
        _mm_cmpeq_epi8(v, _mm_set1_epi8(0x20)));
    return _mm_movemask_epi8(ok) == 0xFFFF;
#else
    return mip_jsonnum_plain8(mip_jsonnum_load8(p));
#endif
}

/* Whether the 8 octets (as loaded by mip_jsonnum_load8) are all ASCII digits. */
static inline int mip_jsonnum_digits8(uint64_t v) {
    return ((v & 0xF0F0F0F0F0F0F0F0ULL)
            | (((v + 0x0606060606060606ULL) & 0xF0F0F0F0F0F0F0F0ULL) >> 4))
           == 0x3333333333333333ULL;
}

/* The value of 8 ASCII digits, the first (most significant) in the low octet. */
static inline uint32_t mip_jsonnum_value8(uint64_t v) {
    v = (v & 0x0F0F0F0F0F0F0F0FULL) * 2561 >> 8;              /* pairs: 10 * a + b */
    v = (v & 0x00FF00FF00FF00FFULL) * 6553601 >> 16;          /* quads: 100 * ab + cd */
    return (uint32_t)((v & 0x0000FFFF0000FFFFULL) * 42949672960001ULL >> 32);
}

#if defined(__SSE2__)
static const unsigned char mip_jsonnum_prefix[32] = {
    255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255};

/* How many of p[0..15] are ASCII digits before any other octet (0 to 16), and in *value
 * those digits followed by zeros to 16 (their value times 10**(16 - that count)): SSE2. */
static inline int mip_jsonnum_digits16(const unsigned char *p, uint64_t *value) {
    __m128i v = _mm_sub_epi8(_mm_loadu_si128((const __m128i *)p), _mm_set1_epi8('0'));
    __m128i zero = _mm_setzero_si128();
    __m128i pairs, quads, eights;
    int n = __builtin_ctz(~(unsigned)_mm_movemask_epi8(
        _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(9)), v)));
    if (n < 16)
        v = _mm_and_si128(v, _mm_loadu_si128((const __m128i *)(mip_jsonnum_prefix + 16 - n)));
    /* 16-bit lanes, the first digit of each pair weighed 10: 8 values of two digits */
    pairs = _mm_packs_epi32(
        _mm_madd_epi16(_mm_unpacklo_epi8(v, zero), _mm_set_epi16(1, 10, 1, 10, 1, 10, 1, 10)),
        _mm_madd_epi16(_mm_unpackhi_epi8(v, zero), _mm_set_epi16(1, 10, 1, 10, 1, 10, 1, 10)));
    /* 4 values of four digits (under 10000: they fit 16 bits), then 2 of eight */
    quads = _mm_madd_epi16(pairs, _mm_set_epi16(1, 100, 1, 100, 1, 100, 1, 100));
    quads = _mm_packs_epi32(quads, quads);
    eights = _mm_madd_epi16(quads, _mm_set_epi16(1, 10000, 1, 10000, 1, 10000, 1, 10000));
    *value = (uint64_t)(uint32_t)_mm_cvtsi128_si32(eights) * 100000000
             + (uint32_t)_mm_cvtsi128_si32(_mm_srli_si128(eights, 4));
    return n;
}
#endif

/* The high 64 bits of a * b, the low ones in *low. */
static inline uint64_t mip_jsonnum_mul128(uint64_t a, uint64_t b, uint64_t *low) {
#if defined(__SIZEOF_INT128__)
    unsigned __int128 r = (unsigned __int128)a * b;
    *low = (uint64_t)r;
    return (uint64_t)(r >> 64);
#else
    uint64_t a0 = (uint32_t)a, a1 = a >> 32, b0 = (uint32_t)b, b1 = b >> 32;
    uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    uint64_t middle = p10 + (p00 >> 32) + (uint32_t)p01;
    *low = (middle << 32) | (uint32_t)p00;
    return p11 + (middle >> 32) + (p01 >> 32);
#endif
}

static inline int mip_jsonnum_leading_zeros(uint64_t v) {  /* v != 0 */
#if defined(__GNUC__)
    return __builtin_clzll(v);
#else
    int n = 0;
    while (!(v & 0x8000000000000000ULL)) {
        v <<= 1;
        n++;
    }
    return n;
#endif
}

/* A number as read: value = mantissa * 10**exp10 (negated when negative), digits: the
 * significant digits seen (more than 19: the mantissa holds the first 19 only). */
typedef struct {
    uint64_t mantissa;
    int digits;
    int exp10;
    int negative;
    int integral;
} mip_jsonnum_number;

static inline int mip_jsonnum_digit(unsigned char c) {
    return (unsigned char)(c - '0') <= 9;
}

/* The digits from p[i] on, appended to *m (wrapping past 19 digits): the index after them. */
static inline ptrdiff_t mip_jsonnum_digit_run(const unsigned char *p, ptrdiff_t i,
                                              ptrdiff_t end, uint64_t *m) {
    uint64_t chunk, value = *m;
    while (end - i >= 8 && mip_jsonnum_digits8(chunk = mip_jsonnum_load8(p + i))) {
        value = value * 100000000 + mip_jsonnum_value8(chunk);
        i += 8;
    }
    while (i < end && mip_jsonnum_digit(p[i])) {
        value = value * 10 + (p[i] - '0');
        i++;
    }
    *m = value;
    return i;
}

/* The JSON number -?(0|[1-9]d*)(.d+)?([eE][+-]?d+)? at p[i] in one pass, for the usual
 * numbers, those of at most 19 digits: the index after it; -1 for any other text (too many
 * digits, or not a number), which the caller then reads the careful way. The caller also
 * checks what follows (a character that could continue a number is an error). */
static inline ptrdiff_t mip_jsonnum_scan_short(const unsigned char *p, ptrdiff_t i,
                                               ptrdiff_t end, mip_jsonnum_number *out) {
    uint64_t m = 0;
    ptrdiff_t first, fraction;
    int e = 0, padding = 0;
    out->negative = i < end && p[i] == '-';
    i += out->negative;
    first = i;
    if (i >= end || !mip_jsonnum_digit(p[i]))
        return -1;
    if (p[i] == '0') {
        i++;
    } else {
        i = mip_jsonnum_digit_run(p, i, end, &m);
    }
    out->integral = 1;
    out->exp10 = 0;
    if (i < end && p[i] == '.') {
        out->integral = 0;
        fraction = ++i;
#if defined(__SSE2__)
        /* the usual fraction of a printed float, in one step: 16 digits or more, or at
         * least 8 after at most 3 (then read as 16, zeros added, for 19 digits at most) */
        uint64_t sixteen;
        int n = end - i >= 16 ? mip_jsonnum_digits16(p + i, &sixteen) : 0;
        if (n == 16 || (n >= 8 && fraction - first <= 4)) {
            m = m * 10000000000000000ULL + sixteen;  /* (wraps past 19 digits) */
            i += n;
            padding = 16 - n;
            while (i < end && mip_jsonnum_digit(p[i])) {  /* (the few left, if any) */
                m = m * 10 + (p[i] - '0');
                i++;
            }
        } else
#endif
        i = mip_jsonnum_digit_run(p, i, end, &m);
        if (i == fraction)
            return -1;
        out->exp10 = -(int)(i - fraction + padding);
    }
    /* digits written, with the "0" before a '.' and zeros after it: at least the
     * significant ones; more than 19 may have wrapped the mantissa */
    if (i - first - !out->integral + padding > 19)
        return -1;
    out->digits = (int)(i - first - !out->integral + padding);
    out->mantissa = m;
    if (i < end && (p[i] | 0x20) == 'e') {
        out->integral = 0;
        i++;
        int negative = i < end && p[i] == '-';
        if (i < end && (p[i] == '-' || p[i] == '+'))
            i++;
        if (i >= end || !mip_jsonnum_digit(p[i]))
            return -1;
        while (i < end && mip_jsonnum_digit(p[i])) {
            if (e < 100000)
                e = e * 10 + (p[i] - '0');
            i++;
        }
        out->exp10 += negative ? -e : e;
    }
    return i;
}

#define MIP_POW5_LOWEST (-342)  /* the table's powers of five: 5**-342 .. 5**308 */
#define MIP_POW5_HIGHEST 308

/* w * 10**q correctly rounded to a double (to nearest, ties to even), for a decimal
 * significand w of at most 19 digits, exactly as read (not truncated): Eisel-Lemire, as in
 * fast_float's compute_float, which for such w needs no fallback (Mushtak and Lemire, "Fast
 * number parsing without fallback", 2023). pow5: for each power of five from 5**-342 up,
 * its 128 leading bits (high word first), truncated, those of 5**-27 .. 5**-1 plus one. */
static inline double mip_jsonnum_to_double(uint64_t w, int q, const uint64_t *pow5) {
    uint64_t high, low, second_high, second_low, mantissa, bits;
    int lz, upperbit, shift, power2;
    const uint64_t *entry;
    double d;
    if (w == 0 || q < MIP_POW5_LOWEST)
        return 0.0;
    if (q > MIP_POW5_HIGHEST)
        return (double)INFINITY;
    lz = mip_jsonnum_leading_zeros(w);
    w <<= lz;
    entry = pow5 + 2 * (q - MIP_POW5_LOWEST);
    high = mip_jsonnum_mul128(w, entry[0], &low);
    if ((high & 0x1FF) == 0x1FF) {  /* the 55 bits kept may take a carry from below */
        second_high = mip_jsonnum_mul128(w, entry[1], &second_low);
        low += second_high;
        if (second_high > low)
            high++;
    }
    upperbit = (int)(high >> 63);
    shift = upperbit + 64 - 52 - 3;
    mantissa = high >> shift;
    /* floor(q * log2(10)) + 63 as ((152170 + 65536) * q) >> 16, with an arithmetic shift */
    power2 = (int)((((int64_t)(152170 + 65536) * q) >> 16) + 63) + upperbit - lz + 1023;
    if (power2 <= 0) {  /* subnormal, or zero */
        if (-power2 + 1 >= 64)
            return 0.0;
        mantissa >>= -power2 + 1;
        mantissa += mantissa & 1;
        mantissa >>= 1;
        power2 = mantissa < (1ULL << 52) ? 0 : 1;
        bits = mantissa | ((uint64_t)power2 << 52);
        memcpy(&d, &bits, 8);
        return d;
    }
    /* exactly between two doubles (possible only for small q): to even, not up */
    if (low <= 1 && q >= -4 && q <= 23 && (mantissa & 3) == 1
            && (mantissa << shift) == high)
        mantissa &= ~1ULL;
    mantissa += mantissa & 1;
    mantissa >>= 1;
    if (mantissa >= (2ULL << 52)) {
        mantissa = 1ULL << 52;
        power2++;
    }
    mantissa &= ~(1ULL << 52);
    if (power2 >= 0x7FF)
        return (double)INFINITY;
    bits = mantissa | ((uint64_t)power2 << 52);
    memcpy(&d, &bits, 8);
    return d;
}

/* Whether the double a, within 6 ulps of the correctly rounded double d of the same number
 * (as a mantissa of at most 19 digits times an exact power of ten is, in one rounding each),
 * rounds to the same FP32 as d (to nearest, ties to even). An FP32 normal is the double's
 * bit pattern rounded to a multiple of 2**29 (its 29 low bits dropped), and the patterns of
 * positive doubles are ordered as the values: a and d, a few patterns apart, round alike
 * unless a's 29 low bits are near the midpoint 2**28; both are FP32 normals, away from the
 * binades on the edges (a double written from an FP32 value is one, low bits all 0). */
static inline int mip_jsonnum_fp32_settled(double a) {
    uint64_t bits, low;
    int power2;
    memcpy(&bits, &a, 8);
    power2 = (int)((bits >> 52) & 0x7FF);
    low = bits & ((1ULL << 29) - 1);
    return power2 > 1023 - 126 && power2 < 1023 + 127
           && (low < (1ULL << 28) - 64 || low > (1ULL << 28) + 64);
}

#endif
