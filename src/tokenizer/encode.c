/* encode.c - text to ids: added tokens, NFC, the pre-tokenizer regex, then BPE.
 *
 * The stages follow Hugging Face's order. Added tokens whose "normalized" flag is false
 * (all of Qwen2's) are found in the raw text first, leftmost-longest, honouring
 * lstrip/rstrip/single_word; each span between them is normalized (NFC) on its own, then
 * searched for the "normalized" added tokens, then cut by the Split regex (PCRE2, UTF and
 * Unicode properties, JIT), and each piece is merged by BPE.
 *
 * Text need not be valid UTF-8: a span is cut into maximal valid runs, which go through
 * the stages above, and ill-formed bytes, each of which becomes its single-byte token, so
 * decoding gives the bytes back. PCRE2 only ever sees validated runs, which lets every
 * match call skip PCRE2's own UTF check (otherwise it rescans the rest of the subject on
 * each call: quadratic in the text length).
 */
#include "tok_internal.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

typedef struct encoder {
    const kvd_tokenizer *tok;
    bool parse_special;
    tok_ids out;
    tok_bpe_scratch scratch;
    pcre2_match_data *match; /* NULL without a split regex */
} encoder;

int tok_nfc(const unsigned char *s, size_t len, unsigned char **out, size_t *out_len)
{
    /* Below U+0300 (lead bytes < 0xCC) every character is already NFC and nothing composes
     * with it from the left, so text made only of those is its own normal form: the common
     * case skips utf8proc entirely. */
    size_t i = 0;
    while (i < len && s[i] < 0xCC)
        i++;
    if (i < len) {
        utf8proc_uint8_t *dst = NULL;
        utf8proc_ssize_t n = utf8proc_map(s, (utf8proc_ssize_t)len, &dst,
                                          UTF8PROC_STABLE | UTF8PROC_COMPOSE);
        if (n == UTF8PROC_ERROR_NOMEM)
            return KVD_ENOMEM;
        if (n >= 0) {
            if ((size_t)n == len && memcmp(dst, s, len) == 0) {
                free(dst);
            } else {
                *out = dst;
                *out_len = (size_t)n;
                return 1;
            }
        }
        /* n < 0 otherwise means input utf8proc calls invalid: callers pass only valid
         * runs, so leave such text unnormalized rather than fail. */
    }
    *out = (unsigned char *)s;
    *out_len = len;
    return 0;
}

static size_t char_len_at(const unsigned char *s, size_t avail)
{
    size_t n;
    tok_utf8_classify(s, avail, &n);
    return n ? n : 1;
}

/* Cuts valid UTF-8 s[0..len) by the pre-tokenizer regex: matches and the gaps between them
 * are pieces (Split "Isolated"); empty matches are skipped as Hugging Face does. */
static int encode_pieces(encoder *enc, const unsigned char *s, size_t len)
{
    const kvd_tokenizer *tok = enc->tok;
    if (len == 0)
        return KVD_OK;
    if (!tok->split_re)
        return tok_bpe_piece(tok, s, len, &enc->scratch, &enc->out);
    size_t piece_start = 0, offset = 0;
    int rc;
    while (offset < len) {
        size_t match_start, match_end;
        int m = pcre2_match(tok->split_re, s, len, offset, PCRE2_NO_UTF_CHECK, enc->match, NULL);
        if (m < 0 && m != PCRE2_ERROR_NOMATCH) /* JIT stack exhausted: the interpreter uses the heap */
            m = pcre2_match(tok->split_re, s, len, offset, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT,
                            enc->match, NULL);
        if (m == PCRE2_ERROR_NOMATCH)
            break;
        if (m < 0) {
            /* Still failing (a match or heap limit): take one character as its own piece
             * rather than fail the whole call. */
            match_start = offset;
            match_end = offset + char_len_at(s + offset, len - offset);
        } else {
            const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(enc->match);
            match_start = ov[0];
            match_end = ov[1];
        }
        if (match_end <= match_start || match_start < piece_start) {
            if (match_start >= len)
                break;
            offset = match_start + char_len_at(s + match_start, len - match_start);
            continue;
        }
        if (match_start > piece_start &&
            (rc = tok_bpe_piece(tok, s + piece_start, match_start - piece_start, &enc->scratch,
                                &enc->out)) < 0)
            return rc;
        if ((rc = tok_bpe_piece(tok, s + match_start, match_end - match_start, &enc->scratch,
                                &enc->out)) < 0)
            return rc;
        piece_start = offset = match_end;
    }
    if (piece_start < len)
        return tok_bpe_piece(tok, s + piece_start, len - piece_start, &enc->scratch, &enc->out);
    return KVD_OK;
}

typedef int (*span_fn)(encoder *enc, const unsigned char *s, size_t len);

static bool is_word_before(const unsigned char *s, size_t at)
{
    uint32_t cp;
    return at > 0 && tok_utf8_decode_before(s, at, &cp) < at && tok_is_word_char(cp);
}

static bool is_word_at(const unsigned char *s, size_t len, size_t at)
{
    uint32_t cp;
    return at < len && tok_utf8_decode(s + at, len - at, &cp) > 0 && tok_is_word_char(cp);
}

/* The longest eligible added token starting at s[at], or NULL. */
static const tok_added *added_at(const encoder *enc, const unsigned char *s, size_t len, size_t at,
                                 bool normalized)
{
    const kvd_tokenizer *tok = enc->tok;
    for (uint32_t k = tok->added_first[s[at]]; k < tok->added_first[s[at] + 1]; k++) {
        const tok_added *a = &tok->added[tok->added_order[k]];
        if (a->normalized != normalized || (a->special && !enc->parse_special))
            continue;
        if (a->len <= len - at && memcmp(s + at, a->content, a->len) == 0)
            return a;
    }
    return NULL;
}

/* Finds the added tokens of one kind (normalized or not) in s, emitting their ids, and
 * hands every span between them to on_span. Mirrors Hugging Face's AddedVocabulary:
 * leftmost-longest matches that do not overlap; a single_word token glued to a word
 * character is dropped and the search resumes after it; lstrip/rstrip widen the match
 * over adjacent whitespace, which then belongs to the token. */
static int split_added(encoder *enc, const unsigned char *s, size_t len, bool normalized,
                       span_fn on_span)
{
    const kvd_tokenizer *tok = enc->tok;
    size_t span_start = 0, pos = 0;
    int rc;
    while (pos < len) {
        if (tok->added_first[s[pos]] == tok->added_first[s[pos] + 1]) {
            pos++;
            continue;
        }
        const tok_added *a = added_at(enc, s, len, pos, normalized);
        if (!a) {
            pos++;
            continue;
        }
        size_t start = pos, stop = pos + a->len;
        if (a->single_word && (is_word_before(s, start) || is_word_at(s, len, stop))) {
            pos = stop;
            continue;
        }
        uint32_t cp;
        if (a->lstrip) {
            size_t before;
            while (start > span_start && (before = tok_utf8_decode_before(s, start, &cp)) < start &&
                   before >= span_start && tok_is_white_space(cp))
                start = before;
        }
        if (a->rstrip) {
            size_t step;
            while (stop < len && (step = tok_utf8_decode(s + stop, len - stop, &cp)) > 0 &&
                   tok_is_white_space(cp))
                stop += step;
        }
        if (start > span_start && (rc = on_span(enc, s + span_start, start - span_start)) < 0)
            return rc;
        if ((rc = tok_ids_reserve(&enc->out, 1)) < 0)
            return rc;
        enc->out.ids[enc->out.len++] = a->id;
        span_start = pos = stop;
    }
    return span_start < len ? on_span(enc, s + span_start, len - span_start) : KVD_OK;
}

static int encode_normalized_span(encoder *enc, const unsigned char *s, size_t len)
{
    if (enc->tok->any_normalized_added)
        return split_added(enc, s, len, true, encode_pieces);
    return encode_pieces(enc, s, len);
}

static int encode_valid_run(encoder *enc, const unsigned char *s, size_t len)
{
    if (!enc->tok->nfc)
        return encode_normalized_span(enc, s, len);
    unsigned char *norm;
    size_t norm_len;
    int rc = tok_nfc(s, len, &norm, &norm_len);
    if (rc < 0)
        return rc;
    int owned = rc;
    rc = encode_normalized_span(enc, norm, norm_len);
    if (owned)
        free(norm);
    return rc;
}

/* A span between raw-text added tokens: valid runs go through the pipeline, ill-formed
 * bytes become single-byte tokens. */
static int encode_raw_span(encoder *enc, const unsigned char *s, size_t len)
{
    size_t run_start = 0, pos = 0;
    int rc;
    while (pos < len) {
        size_t n;
        if (tok_utf8_classify(s + pos, len - pos, &n) == TOK_UTF8_OK) {
            pos += n;
            continue;
        }
        if (pos > run_start && (rc = encode_valid_run(enc, s + run_start, pos - run_start)) < 0)
            return rc;
        if ((rc = tok_ids_reserve(&enc->out, n)) < 0)
            return rc;
        for (size_t k = 0; k < n; k++)
            enc->out.ids[enc->out.len++] = enc->tok->byte_id[s[pos + k]];
        run_start = pos += n;
    }
    return pos > run_start ? encode_valid_run(enc, s + run_start, pos - run_start) : KVD_OK;
}

int kvd_tokenizer_encode(const kvd_tokenizer *tok, const char *text, size_t len,
                         bool parse_special, int32_t **ids)
{
    if (!tok || !ids || (!text && len > 0))
        return KVD_EINVAL;
    encoder enc = {.tok = tok, .parse_special = parse_special};
    int rc = KVD_OK;
    if (tok->split_re) {
        enc.match = pcre2_match_data_create_from_pattern(tok->split_re, NULL);
        if (!enc.match)
            rc = KVD_ENOMEM;
    }
    if (rc == KVD_OK && len > 0)
        rc = split_added(&enc, (const unsigned char *)text, len, false, encode_raw_span);
    if (rc == KVD_OK && enc.out.len > INT_MAX)
        rc = KVD_ETOOLONG;
    if (rc == KVD_OK && !enc.out.ids) /* the caller always gets an array to free */
        rc = tok_ids_reserve(&enc.out, 1);
    pcre2_match_data_free(enc.match);
    tok_bpe_scratch_free(&enc.scratch);
    if (rc < 0) {
        free(enc.out.ids);
        return rc;
    }
    *ids = enc.out.ids;
    return (int)enc.out.len;
}
