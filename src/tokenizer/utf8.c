/* utf8.c - UTF-8 well-formedness, character classes and GPT-2's byte-level alphabet.
 *
 * Well-formedness follows Unicode's table 3-7 exactly, because the encoder hands the
 * valid runs it finds to PCRE2 with PCRE2_NO_UTF_CHECK (checking once instead of on every
 * match call) and the streaming decoder promises never to emit a broken sequence: both
 * depend on this file agreeing with PCRE2 and utf8proc on what valid UTF-8 is.
 */
#include "tok_internal.h"

#include <utf8proc.h>

int tok_utf8_classify(const unsigned char *s, size_t avail, size_t *n)
{
    unsigned char b = s[0];
    if (b < 0x80) {
        *n = 1;
        return TOK_UTF8_OK;
    }
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (b >= 0xC2 && b <= 0xDF) {
        need = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
        need = 3;
        if (b == 0xE0)
            lo = 0xA0; /* overlong */
        else if (b == 0xED)
            hi = 0x9F; /* surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 4;
        if (b == 0xF0)
            lo = 0x90; /* overlong */
        else if (b == 0xF4)
            hi = 0x8F; /* past U+10FFFF */
    } else {
        *n = 1;
        return TOK_UTF8_INVALID;
    }
    for (size_t k = 1; k < need; k++) {
        if (k >= avail) {
            *n = avail;
            return TOK_UTF8_TRUNCATED;
        }
        unsigned char c = s[k];
        unsigned char min = k == 1 ? lo : 0x80, max = k == 1 ? hi : 0xBF;
        if (c < min || c > max) {
            *n = k;
            return TOK_UTF8_INVALID;
        }
    }
    *n = need;
    return TOK_UTF8_OK;
}

size_t tok_utf8_decode(const unsigned char *s, size_t avail, uint32_t *cp)
{
    size_t n;
    if (avail == 0 || tok_utf8_classify(s, avail, &n) != TOK_UTF8_OK)
        return 0;
    static const unsigned char lead_mask[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
    uint32_t c = s[0] & lead_mask[n];
    for (size_t k = 1; k < n; k++)
        c = (c << 6) | (s[k] & 0x3F);
    *cp = c;
    return n;
}

size_t tok_utf8_decode_before(const unsigned char *s, size_t end, uint32_t *cp)
{
    size_t start = end;
    /* A character is at most 4 bytes: back up over up to 3 continuation bytes. */
    while (start > 0 && end - start < 4) {
        start--;
        if ((s[start] & 0xC0) != 0x80)
            break;
    }
    if (start == end || tok_utf8_decode(s + start, end - start, cp) != end - start)
        return end;
    return start;
}

bool tok_is_white_space(uint32_t cp)
{
    if (cp <= 0x20)
        return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
    switch (cp) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029:
    case 0x202F: case 0x205F: case 0x3000:
        return true;
    default:
        return cp >= 0x2000 && cp <= 0x200A;
    }
}

bool tok_is_word_char(uint32_t cp)
{
    if (cp < 0x80)
        return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') ||
               cp == '_';
    if (cp == 0x200C || cp == 0x200D)
        return true;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return false;
    }
}

/* Bytes that stand for themselves: '!'..'~', U+00A1..U+00AC, U+00AE..U+00FF. Every other
 * byte, in increasing order, takes the next code point from U+0100 up, so that no token
 * contains a space or a control character. */
static bool byte_is_printable(unsigned b)
{
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

uint32_t tok_byte_to_unicode(unsigned char b)
{
    if (byte_is_printable(b))
        return b;
    uint32_t rank = 0; /* how many non-printable bytes come before b */
    for (unsigned x = 0; x < b; x++)
        rank += !byte_is_printable(x);
    return 256 + rank;
}

void tok_byte_level_inverse(int16_t unicode_to_byte[TOK_BYTE_LEVEL_CODEPOINTS])
{
    for (size_t cp = 0; cp < TOK_BYTE_LEVEL_CODEPOINTS; cp++)
        unicode_to_byte[cp] = -1;
    for (unsigned b = 0; b < 256; b++)
        unicode_to_byte[tok_byte_to_unicode((unsigned char)b)] = (int16_t)b;
}
