/* decode.c - ids to bytes, whole or streamed, and the small queries on ids.
 *
 * kvd_tokenizer_decode is byte-exact: it concatenates what each id stands for, so
 * decode(encode(x)) gives back x (as NFC) even when x was not valid UTF-8. The streaming
 * kvd_detokenizer is what goes to clients: a byte-level token can end in the middle of a
 * character (an emoji is often three or four tokens), so it holds back an incomplete
 * tail until the next token completes it, and replaces ill-formed bytes by U+FFFD, one
 * per maximal ill-formed subpart (Unicode's recommended practice, what WHATWG decoders
 * and Rust's from_utf8_lossy do). Its output is always valid UTF-8 and push never
 * allocates: it runs once per generated token.
 *
 * Ids the tokenizer has no text for (a model's padding rows past its vocabulary, e.g.
 * 151669..151935 for Qwen2, or a gap in a vocabulary) decode as nothing, whole or
 * streamed: a sampled id must never stop a stream or a tool. Only negative ids are
 * refused, since no model produces them.
 */
#include "tok_internal.h"

#include <stdlib.h>
#include <string.h>

static const unsigned char replacement[3] = {0xEF, 0xBF, 0xBD}; /* U+FFFD */

/* An id with text; other non-negative ids decode as nothing. */
static bool id_has_text(const kvd_tokenizer *tok, int32_t id)
{
    return id >= 0 && id < tok->num_ids && (tok->id_flags[id] & TOK_ID_PRESENT);
}

int kvd_tokenizer_vocab_size(const kvd_tokenizer *tok)
{
    return tok->num_ids;
}

int kvd_tokenizer_token_id(const kvd_tokenizer *tok, const char *content)
{
    size_t len = strlen(content);
    for (size_t i = 0; i < tok->num_added; i++) {
        const tok_added *a = &tok->added[i];
        uint32_t off = tok->token_offset[a->id];
        /* Compare with the content as written (a normalized token matches its NFC). */
        if (tok->token_offset[a->id + 1] - off == len &&
            memcmp(tok->token_bytes + off, content, len) == 0)
            return a->id;
    }
    return -1;
}

bool kvd_tokenizer_is_special(const kvd_tokenizer *tok, int32_t id)
{
    return id >= 0 && id < tok->num_ids && (tok->id_flags[id] & TOK_ID_SPECIAL);
}

size_t kvd_tokenizer_max_token_bytes(const kvd_tokenizer *tok)
{
    /* One push writes at most the held-back bytes (< 4) plus the token's bytes, each
     * possibly becoming a 3-byte U+FFFD. */
    return 3 * (tok->max_token_len + 3);
}

char *kvd_tokenizer_decode(const kvd_tokenizer *tok, const int32_t *ids, size_t n,
                           bool skip_special, size_t *out_len, kvd_error *err)
{
    if (!tok || (!ids && n > 0)) {
        kvd_error_set(err, KVD_EINVAL, "tokenizer: decode given no ids");
        return NULL;
    }
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0) {
            kvd_error_set(err, KVD_EINVAL, "tokenizer: id %d at position %zu is negative", ids[i], i);
            return NULL;
        }
        if (id_has_text(tok, ids[i]))
            total += tok->token_offset[ids[i] + 1] - tok->token_offset[ids[i]];
    }
    char *out = malloc(total + 1);
    if (!out) {
        kvd_error_set(err, KVD_ENOMEM, "tokenizer: out of memory decoding %zu ids", n);
        return NULL;
    }
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        if (!id_has_text(tok, ids[i]) || (skip_special && (tok->id_flags[ids[i]] & TOK_ID_SPECIAL)))
            continue;
        uint32_t off = tok->token_offset[ids[i]], tlen = tok->token_offset[ids[i] + 1] - off;
        memcpy(out + len, tok->token_bytes + off, tlen);
        len += tlen;
    }
    out[len] = '\0';
    if (out_len)
        *out_len = len;
    return out;
}

void kvd_detokenizer_init(kvd_detokenizer *d, const kvd_tokenizer *tok, bool skip_special)
{
    *d = (kvd_detokenizer){.tok = tok, .skip_special = skip_special};
}

/* Output with a capacity check: each write leaves room for the final NUL. */
typedef struct sink {
    char *out;
    size_t cap, len;
    bool overflow;
} sink;

static void sink_put(sink *s, const unsigned char *bytes, size_t n)
{
    if (s->overflow || s->cap - s->len <= n) {
        s->overflow = true;
        return;
    }
    memcpy(s->out + s->len, bytes, n);
    s->len += n;
}

int kvd_detokenizer_push(kvd_detokenizer *d, int32_t id, char *out, size_t out_cap)
{
    const kvd_tokenizer *tok = d->tok;
    if (!out || out_cap == 0 || id < 0)
        return KVD_EINVAL;
    sink s = {.out = out, .cap = out_cap};
    if (!id_has_text(tok, id) || (d->skip_special && (tok->id_flags[id] & TOK_ID_SPECIAL))) {
        out[0] = '\0';
        return 0;
    }
    const unsigned char *bytes = tok->token_bytes + tok->token_offset[id];
    size_t len = tok->token_offset[id + 1] - tok->token_offset[id], pos = 0, n;
    unsigned char pending[8];
    size_t num_pending = (size_t)d->num_pending;
    memcpy(pending, d->pending, num_pending);

    /* First finish the character held back from earlier tokens. */
    if (num_pending > 0) {
        unsigned char head[8];
        size_t take = len < 4 ? len : 4;
        memcpy(head, pending, num_pending);
        memcpy(head + num_pending, bytes, take);
        int kind = tok_utf8_classify(head, num_pending + take, &n);
        if (kind == TOK_UTF8_TRUNCATED) {
            /* Still incomplete: the whole token joins the held-back bytes. */
            memcpy(d->pending + num_pending, bytes, len);
            d->num_pending = (int)(num_pending + len);
            out[0] = '\0';
            return 0;
        }
        /* n > num_pending when OK; when INVALID the subpart may end inside the pending
         * bytes only if they were ill-formed, which push never leaves behind. */
        sink_put(&s, kind == TOK_UTF8_OK ? head : replacement, kind == TOK_UTF8_OK ? n : 3);
        pos = n > num_pending ? n - num_pending : 0;
        num_pending = 0;
    }
    while (pos < len) {
        int kind = tok_utf8_classify(bytes + pos, len - pos, &n);
        if (kind == TOK_UTF8_TRUNCATED) {
            memcpy(pending, bytes + pos, n);
            num_pending = n;
            break;
        }
        sink_put(&s, kind == TOK_UTF8_OK ? bytes + pos : replacement, kind == TOK_UTF8_OK ? n : 3);
        pos += n;
    }
    if (s.overflow)
        return KVD_EINVAL; /* the state is untouched: the caller may retry with more room */
    memcpy(d->pending, pending, num_pending);
    d->num_pending = (int)num_pending;
    out[s.len] = '\0';
    return (int)s.len;
}

int kvd_detokenizer_flush(kvd_detokenizer *d, char *out, size_t out_cap)
{
    if (!out || out_cap == 0)
        return KVD_EINVAL;
    sink s = {.out = out, .cap = out_cap};
    /* Pending bytes are always one well-formed prefix of a single character. */
    if (d->num_pending > 0)
        sink_put(&s, replacement, 3);
    if (s.overflow)
        return KVD_EINVAL;
    d->num_pending = 0;
    out[s.len] = '\0';
    return (int)s.len;
}
