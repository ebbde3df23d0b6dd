/* kvd_tokenizer.h - exact byte-level BPE of a Hugging Face tokenizer.json (Qwen2 family).
 *
 * Encoding: added/special tokens (<|im_start|> ...) are matched first, then each
 * remaining span is NFC-normalised (utf8proc), split by the pre-tokenizer regex
 * (PCRE2, UTF + Unicode properties, JIT), mapped byte-to-unicode and merged by rank.
 * Decoding reverses the byte mapping. A kvd_detokenizer streams text out token by
 * token and never emits a broken UTF-8 sequence: incomplete bytes are held back.
 *
 * Threading: a kvd_tokenizer is immutable after load except for its merge cache,
 * which is internally locked, so encode/decode may be called from several threads.
 */
#ifndef KVD_TOKENIZER_H
#define KVD_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"

typedef struct kvd_tokenizer kvd_tokenizer;

/* Loads tokenizer.json at path. NULL with err set on a missing/malformed file. */
kvd_tokenizer *kvd_tokenizer_load(const char *path, kvd_error *err);
void kvd_tokenizer_destroy(kvd_tokenizer *tok);

/* Number of ids (vocabulary plus added tokens): one past the largest id. */
int kvd_tokenizer_vocab_size(const kvd_tokenizer *tok);
/* Id of an added/special token by its content ("<|im_end|>"), or -1. */
int kvd_tokenizer_token_id(const kvd_tokenizer *tok, const char *content);
bool kvd_tokenizer_is_special(const kvd_tokenizer *tok, int32_t id);

/* Encodes len bytes of text (invalid UTF-8 is accepted and encoded byte-wise, never
 * rejected: each ill-formed byte becomes its single-byte token, so decode gives it back).
 * parse_special: match special tokens ("special": true, e.g. <|im_start|>) in the text;
 * when false they are encoded as plain text. Non-special added tokens (<tool_call>,
 * <think>, <|fim_prefix|> ...) are matched either way, as Hugging Face's tokenizers do.
 * No BOS/EOS is ever added. On success returns the number of ids (possibly 0) and sets
 * *ids to a malloc'ed array the caller frees (never NULL); returns KVD_ENOMEM on
 * allocation failure, KVD_EINVAL for NULL arguments, and leaves *ids alone on failure. */
int kvd_tokenizer_encode(const kvd_tokenizer *tok, const char *text, size_t len,
                         bool parse_special, int32_t **ids);

/* Decodes ids to bytes, byte-exact: decode(encode(x)) is x after NFC, and ids that end
 * inside a character give the partial bytes (use kvd_detokenizer for text shown to
 * clients). Ids without text (>= the vocabulary size, e.g. a model's padding rows, or a
 * gap in the vocabulary) decode as nothing. Returns a malloc'ed NUL-terminated string
 * (its length in *out_len if not NULL; the bytes may hold NULs), or NULL on a negative
 * id (err set, KVD_EINVAL) or allocation failure.
 * Special tokens are rendered as their content unless skip_special; non-special added
 * tokens are always rendered. */
char *kvd_tokenizer_decode(const kvd_tokenizer *tok, const int32_t *ids, size_t n,
                           bool skip_special, size_t *out_len, kvd_error *err);

/* Streaming decode state for one sequence (embedded by its owner). */
typedef struct kvd_detokenizer {
    const kvd_tokenizer *tok;
    bool skip_special;
    unsigned char pending[8]; /* bytes of an incomplete UTF-8 character */
    int num_pending;
} kvd_detokenizer;

void kvd_detokenizer_init(kvd_detokenizer *d, const kvd_tokenizer *tok, bool skip_special);
/* Upper bound on the bytes one kvd_detokenizer_push writes: the longest token plus the
 * held-back bytes, each possibly replaced by U+FFFD (3 bytes). push needs out_cap > this
 * (so the older rule "out_cap > this + 8" stays safe). */
size_t kvd_tokenizer_max_token_bytes(const kvd_tokenizer *tok);

/* Writes the text of id to out (at most out_cap-1 bytes plus NUL) and returns the number
 * of bytes written, holding back an incomplete UTF-8 tail until the next token completes
 * it. The output is always valid UTF-8: ill-formed bytes become U+FFFD, one per maximal
 * ill-formed subpart (a held-back tail cut short by the next token included). A skipped
 * special token, and an id without text, write nothing and keep the held-back bytes.
 * Never allocates. Returns KVD_EINVAL on a negative id or when out_cap is too small; the
 * state is then unchanged. */
int kvd_detokenizer_push(kvd_detokenizer *d, int32_t id, char *out, size_t out_cap);
/* Flushes held-back bytes at end of stream (one U+FFFD for the incomplete character, so
 * 0 or 3 bytes) and resets the state. KVD_EINVAL if out_cap < 4 with bytes held back. */
int kvd_detokenizer_flush(kvd_detokenizer *d, char *out, size_t out_cap);

#endif
