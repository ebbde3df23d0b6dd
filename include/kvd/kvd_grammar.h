/* kvd_grammar.h - constrained decoding: JSON Schema, regular expressions and
 * llama.cpp's GBNF compile to one grammar; a matcher walks it token by token and
 * gives the set of token ids that keep the output inside the grammar.
 *
 * Owns: kvd_grammar_vocab (every token's bytes and a byte trie over them, plus the mask
 * cache entries all grammars share; share it among threads, the cache is locked
 * inside), kvd_grammar (a compiled grammar, reference counted, immutable except its
 * mask cache, locked inside: share it among matchers on any thread; it borrows its
 * vocabulary, which must outlive it), kvd_grammar_matcher (one sequence's position;
 * one thread at a time), kvd_grammar_cache (compiled grammars by source; owns its
 * vocabulary).
 *
 * Masks: bit id of mask[id / 32] (bit id % 32) is set when the token may come next.
 * Special tokens and ids the tokenizer does not define are never set; the caller adds
 * its end-of-sequence ids when kvd_grammar_matcher_can_end() is true. A mask depends
 * only on the tokens the matcher accepted, so a sequence recomputed after preemption
 * or restored from the prefix cache gets the same masks.
 *
 * A schema or grammar kvd cannot compile exactly is an error (KVD_EUNSUPPORTED for a
 * keyword kvd does not implement, KVD_EINVAL for a malformed one) whose message names
 * the keyword; nothing is silently dropped.
 */
#ifndef KVD_GRAMMAR_H
#define KVD_GRAMMAR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_tokenizer.h"

typedef struct kvd_grammar_vocab kvd_grammar_vocab;
typedef struct kvd_grammar kvd_grammar;
typedef struct kvd_grammar_matcher kvd_grammar_matcher;

/* Token bytes of every id below num_ids (the model's vocabulary, >= the tokenizer's).
 * The tokenizer is only read during the call. */
kvd_grammar_vocab *kvd_grammar_vocab_create(const kvd_tokenizer *tok, int num_ids, kvd_error *err);
void kvd_grammar_vocab_destroy(kvd_grammar_vocab *v);
/* uint32 words in one mask: (num_ids + 31) / 32. */
int kvd_grammar_mask_words(const kvd_grammar_vocab *v);

typedef struct kvd_grammar_json_options {
    /* false (the default): an object's declared members come in the order of
     * "properties" (required ones are not moved first, unlike llama.cpp: the schema's
     * order is the author's); true: in any order, each at most once. */
    bool any_order;
} kvd_grammar_json_options;

/* JSON Schema (draft 2020-12 as used in practice, draft 4-7 spellings too). opts may be
 * NULL. Whitespace between tokens: none, one space, or a newline and up to 20
 * spaces/tabs (so both json.dumps and indented output pass). */
kvd_grammar *kvd_grammar_compile_json_schema(const kvd_grammar_vocab *v, const char *schema,
                                             size_t len, const kvd_grammar_json_options *opts,
                                             kvd_error *err);
/* Any JSON object ({"type": "json_object"}). */
kvd_grammar *kvd_grammar_compile_json_object(const kvd_grammar_vocab *v, kvd_error *err);
/* The whole output matches the regular expression (Python syntax subset: literals,
 * classes, . \d \w \s and negations, groups, |, * + ? {m,n}; no backreferences or
 * lookaround). */
kvd_grammar *kvd_grammar_compile_regex(const kvd_grammar_vocab *v, const char *re, size_t len,
                                       kvd_error *err);
/* The output is exactly one of the strings. */
kvd_grammar *kvd_grammar_compile_choice(const kvd_grammar_vocab *v, const char *const *choices,
                                        size_t n, kvd_error *err);
/* llama.cpp's GBNF; the start rule is "root". */
kvd_grammar *kvd_grammar_compile_gbnf(const kvd_grammar_vocab *v, const char *text, size_t len,
                                      kvd_error *err);

/* The mask width in ids (the vocabulary's num_ids). */
int kvd_grammar_num_ids(const kvd_grammar *g);

/* Reference counting (atomic): compile returns one reference. */
kvd_grammar *kvd_grammar_retain(kvd_grammar *g);
void kvd_grammar_release(kvd_grammar *g);

/* A matcher at the start of g (holds a reference to g). */
kvd_grammar_matcher *kvd_grammar_matcher_create(kvd_grammar *g, kvd_error *err);
void kvd_grammar_matcher_destroy(kvd_grammar_matcher *m);
/* Fills mask (kvd_grammar_mask_words words) with the tokens allowed next. */
int kvd_grammar_matcher_fill_mask(kvd_grammar_matcher *m, uint32_t *mask, kvd_error *err);
/* True when the text so far is a whole sentence of the grammar (EOS may come). */
bool kvd_grammar_matcher_can_end(const kvd_grammar_matcher *m);
/* True when nothing but the end may come (the caller should stop the sequence). */
bool kvd_grammar_matcher_is_complete(const kvd_grammar_matcher *m);
/* Advances by one token. KVD_EINVAL (state unchanged) if the token is not allowed. */
int kvd_grammar_matcher_accept(kvd_grammar_matcher *m, int32_t id, kvd_error *err);
/* Tokens accepted so far; undoes the last n of them (n <= that count). */
size_t kvd_grammar_matcher_num_tokens(const kvd_grammar_matcher *m);
int kvd_grammar_matcher_rollback(kvd_grammar_matcher *m, size_t n);

/* --- compiled grammars cached by their source --------------------------------------
 * A bounded cache (least recently used out) of compiled grammars keyed by kind and the
 * exact source bytes (a schema's text as the client sent it, after re-serialising).
 * Thread-safe (one lock; compiling happens outside it): the server's workers share one. */
typedef enum kvd_grammar_kind {
    KVD_GRAMMAR_JSON_SCHEMA, /* source: the schema's JSON text */
    KVD_GRAMMAR_JSON_OBJECT, /* source ignored */
    KVD_GRAMMAR_REGEX,
    KVD_GRAMMAR_CHOICE,      /* source: the choices, each followed by a NUL */
    KVD_GRAMMAR_GBNF,
} kvd_grammar_kind;

typedef struct kvd_grammar_cache kvd_grammar_cache;

/* Takes ownership of vocab (destroyed with the cache). */
kvd_grammar_cache *kvd_grammar_cache_create(kvd_grammar_vocab *vocab, int capacity, kvd_error *err);
void kvd_grammar_cache_destroy(kvd_grammar_cache *c);
/* A new reference to the compiled grammar (compiled now on a miss), or NULL with err
 * set by the compiler. */
kvd_grammar *kvd_grammar_cache_get(kvd_grammar_cache *c, kvd_grammar_kind kind, const char *src, size_t len,
                                   kvd_error *err);
/* Hits and misses so far. */
void kvd_grammar_cache_stats(kvd_grammar_cache *c, uint64_t *hits, uint64_t *misses);

#endif
