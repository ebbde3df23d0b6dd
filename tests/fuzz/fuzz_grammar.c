/* fuzz_grammar.c - libFuzzer target: arbitrary bytes through the JSON Schema, regex and
 * GBNF compilers, then the matcher.
 *
 * The first byte picks the compiler (schema, regex, GBNF), the rest is its source.
 * Whatever compiles must give a matcher whose masks agree with accept: a few steps,
 * each taking the lowest allowed id, must be accepted, and a token outside the mask
 * must be refused. Errors must carry a message. The vocabulary (from the real
 * tokenizer, $KVD_TOKENIZER_JSON or third_party/qwen-tokenizer/tokenizer.json) is
 * the one piece of global state: libFuzzer's entry points take no context.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvd/kvd_grammar.h"
#include "kvd/kvd_tokenizer.h"

static kvd_grammar_vocab *fuzz_vocab;
static uint32_t *fuzz_mask;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "fuzz_grammar: check failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                 \
        }                                                                            \
    } while (0)

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *path = getenv("KVD_TOKENIZER_JSON");
    if (!path)
        path = "third_party/qwen-tokenizer/tokenizer.json";
    kvd_error err = {0};
    kvd_tokenizer *tok = kvd_tokenizer_load(path, &err);
    if (!tok) {
        fprintf(stderr, "fuzz_grammar: %s\n", err.msg);
        exit(1);
    }
    fuzz_vocab = kvd_grammar_vocab_create(tok, 151936, &err);
    kvd_tokenizer_destroy(tok);
    CHECK(fuzz_vocab != NULL);
    fuzz_mask = malloc((size_t)kvd_grammar_mask_words(fuzz_vocab) * sizeof *fuzz_mask);
    CHECK(fuzz_mask != NULL);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 4096)
        return 0;
    const char *src = (const char *)data + 1;
    size_t len = size - 1;
    kvd_error err = {0};
    kvd_grammar *g;
    switch (data[0] % 3) {
    case 0: g = kvd_grammar_compile_json_schema(fuzz_vocab, src, len, NULL, &err); break;
    case 1: g = kvd_grammar_compile_regex(fuzz_vocab, src, len, &err); break;
    default: g = kvd_grammar_compile_gbnf(fuzz_vocab, src, len, &err); break;
    }
    if (!g) {
        CHECK(err.code < 0 && err.msg[0]);
        return 0;
    }
    kvd_grammar_matcher *m = kvd_grammar_matcher_create(g, &err);
    CHECK(m != NULL);
    int words = kvd_grammar_mask_words(fuzz_vocab);
    for (int step = 0; step < 4; step++) {
        CHECK(kvd_grammar_matcher_fill_mask(m, fuzz_mask, &err) == 0);
        int32_t allowed = -1, refused = -1;
        for (int w = 0; w < words && (allowed < 0 || refused < 0); w++) {
            if (fuzz_mask[w] && allowed < 0) allowed = w * 32 + __builtin_ctz(fuzz_mask[w]);
            if (~fuzz_mask[w] && refused < 0) refused = w * 32 + __builtin_ctz(~fuzz_mask[w]);
        }
        if (refused >= 0 && refused < 151936) CHECK(kvd_grammar_matcher_accept(m, refused, NULL) != 0);
        if (allowed < 0) {
            CHECK(kvd_grammar_matcher_can_end(m)); /* nothing allowed: the text must be whole */
            break;
        }
        CHECK(kvd_grammar_matcher_accept(m, allowed, NULL) == 0);
    }
    CHECK(kvd_grammar_matcher_rollback(m, kvd_grammar_matcher_num_tokens(m)) == 0);
    kvd_grammar_matcher_destroy(m);
    kvd_grammar_release(g);
    return 0;
}
