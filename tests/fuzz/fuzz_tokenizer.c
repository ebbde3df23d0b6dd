/* fuzz_tokenizer.c - libFuzzer target: arbitrary bytes through encode, decode and streaming.
 *
 * Loads the real tokenizer once ($KVD_TOKENIZER_JSON, else
 * third_party/qwen-tokenizer/tokenizer.json from the working directory) and, for each
 * input, with and without special-token parsing, checks properties that hold for every
 * byte string, not just valid text:
 *   - encode never fails and gives only ids inside the vocabulary;
 *   - re-encoding the decoded bytes gives the same ids (normalization is idempotent and
 *     ill-formed bytes survive as themselves);
 *   - valid UTF-8 that NFC leaves alone decodes back byte for byte;
 *   - streaming decode writes valid UTF-8 in every piece, within the advertised bound, and
 *     equals whole decoding whenever that is valid UTF-8;
 *   - the NFC shortcut in tok_nfc agrees with utf8proc.
 * The tokenizer pointer is the one piece of global state: libFuzzer's entry points take
 * no context. Build with tests/fuzz/build.sh.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "../../src/tokenizer/tok_internal.h"
#include "kvd/kvd_tokenizer.h"

static kvd_tokenizer *fuzz_tok;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "fuzz_tokenizer: check failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                  \
        }                                                                             \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *path = getenv("KVD_TOKENIZER_JSON");
    if (!path)
        path = "third_party/qwen-tokenizer/tokenizer.json";
    kvd_error err = {0};
    fuzz_tok = kvd_tokenizer_load(path, &err);
    if (!fuzz_tok) {
        fprintf(stderr, "fuzz_tokenizer: %s\n", err.msg);
        exit(1);
    }
    return 0;
}

static bool valid_utf8(const uint8_t *s, size_t len)
{
    while (len > 0) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t n = utf8proc_iterate(s, (utf8proc_ssize_t)len, &cp);
        if (n <= 0)
            return false;
        s += n;
        len -= (size_t)n;
    }
    return true;
}

/* NFC by utf8proc alone, or NULL when data is not valid UTF-8. */
static uint8_t *reference_nfc(const uint8_t *data, size_t size, size_t *len)
{
    if (!valid_utf8(data, size))
        return NULL;
    utf8proc_uint8_t *out = NULL;
    utf8proc_ssize_t n = utf8proc_map(data, (utf8proc_ssize_t)size, &out,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    CHECK(n >= 0);
    *len = (size_t)n;
    return out;
}

static void check_stream(const int32_t *ids, int n, bool skip_special)
{
    size_t cap = kvd_tokenizer_max_token_bytes(fuzz_tok) + 1;
    char *piece = malloc(cap);
    size_t stream_cap = (size_t)n * (cap - 1) + 4, stream_len = 0;
    char *stream = malloc(stream_cap);
    kvd_detokenizer d;
    kvd_detokenizer_init(&d, fuzz_tok, skip_special);
    for (int i = 0; i < n; i++) {
        int k = kvd_detokenizer_push(&d, ids[i], piece, cap);
        CHECK(k >= 0 && piece[k] == '\0');
        CHECK(valid_utf8((const uint8_t *)piece, (size_t)k));
        memcpy(stream + stream_len, piece, (size_t)k);
        stream_len += (size_t)k;
    }
    int k = kvd_detokenizer_flush(&d, piece, cap);
    CHECK(k == 0 || k == 3);
    memcpy(stream + stream_len, piece, (size_t)k);
    stream_len += (size_t)k;
    CHECK(valid_utf8((const uint8_t *)stream, stream_len));
    size_t whole_len;
    char *whole = kvd_tokenizer_decode(fuzz_tok, ids, (size_t)n, skip_special, &whole_len, NULL);
    CHECK(whole != NULL);
    if (valid_utf8((const uint8_t *)whole, whole_len))
        CHECK(whole_len == stream_len && memcmp(whole, stream, whole_len) == 0);
    free(whole);
    free(stream);
    free(piece);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *text = (const char *)data;
    size_t nfc_len = 0;
    uint8_t *nfc = reference_nfc(data, size, &nfc_len);
    if (nfc) {
        unsigned char *mine;
        size_t mine_len;
        int owned = tok_nfc(data, size, &mine, &mine_len);
        CHECK(owned >= 0);
        CHECK(mine_len == nfc_len && memcmp(mine, nfc, nfc_len) == 0);
        if (owned)
            free(mine);
    }
    for (int parse_special = 0; parse_special < 2; parse_special++) {
        int32_t *ids;
        int n = kvd_tokenizer_encode(fuzz_tok, text, size, parse_special, &ids);
        CHECK(n >= 0 && (size_t)n <= 3 * size); /* NFC grows text at most 3x */
        for (int i = 0; i < n; i++)
            CHECK(ids[i] >= 0 && ids[i] < kvd_tokenizer_vocab_size(fuzz_tok));
        size_t len;
        char *back = kvd_tokenizer_decode(fuzz_tok, ids, (size_t)n, false, &len, NULL);
        CHECK(back != NULL);
        if (nfc && nfc_len == size && memcmp(nfc, data, size) == 0)
            CHECK(len == size && memcmp(back, data, size) == 0);
        int32_t *again;
        int m = kvd_tokenizer_encode(fuzz_tok, back, len, parse_special, &again);
        CHECK(m == n && memcmp(again, ids, (size_t)n * sizeof *ids) == 0);
        check_stream(ids, n, false);
        check_stream(ids, n, true);
        free(again);
        free(back);
        free(ids);
    }
    free(nfc);
    return 0;
}
