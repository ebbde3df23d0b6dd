/* tok_internal.h - what the tokenizer's source files share; not a public header.
 *
 * The tokenizer works on raw bytes throughout: every vocabulary entry of tokenizer.json is
 * converted once at load from GPT-2's byte-to-unicode alphabet back to the bytes it
 * stands for, so BPE merges act on byte strings, decoding is a table lookup, and
 * nothing ever maps text to the printable alphabet and back at run time.
 */
#ifndef KVD_TOK_INTERNAL_H
#define KVD_TOK_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "kvd/kvd_tokenizer.h"

/* ---- utf8.c: byte classes and the byte-level alphabet ---- */

enum { TOK_UTF8_OK, TOK_UTF8_TRUNCATED, TOK_UTF8_INVALID };

/* Classifies the bytes at s (avail >= 1) by Unicode's well-formedness table (no overlongs,
 * surrogates or code points past U+10FFFF): TOK_UTF8_OK with *n the character's length,
 * TOK_UTF8_TRUNCATED when all avail bytes are a proper prefix of a character (*n = avail),
 * TOK_UTF8_INVALID with *n the length of the maximal ill-formed subpart, the bytes one
 * U+FFFD replaces. */
int tok_utf8_classify(const unsigned char *s, size_t avail, size_t *n);
/* Decodes the well-formed character at s into *cp and returns its length, or 0. */
size_t tok_utf8_decode(const unsigned char *s, size_t avail, uint32_t *cp);
/* Decodes the well-formed character ending at s[end-1] into *cp and returns its start, or
 * end if the bytes before end do not end with a well-formed character. */
size_t tok_utf8_decode_before(const unsigned char *s, size_t end, uint32_t *cp);
/* Unicode White_Space (what Rust's char::is_whitespace and regex \s match). */
bool tok_is_white_space(uint32_t cp);
/* Rust regex's Unicode \w: letters, marks, decimal digits, letter numbers, connector
 * punctuation and the two join controls. */
bool tok_is_word_char(uint32_t cp);
/* GPT-2's bytes_to_unicode: the printable code point standing for byte b. */
uint32_t tok_byte_to_unicode(unsigned char b);
/* The alphabet's code points are all below this. */
#define TOK_BYTE_LEVEL_CODEPOINTS 324
/* Fills the inverse of tok_byte_to_unicode: the byte for each code point, -1 if none. */
void tok_byte_level_inverse(int16_t unicode_to_byte[TOK_BYTE_LEVEL_CODEPOINTS]);

/* ---- bpe.c: vocabulary and merge tables, the merge loop and its cache ---- */

/* Open-addressing map from a byte string to its id; the bytes live in the tokenizer's
 * id -> bytes table, so a slot is just an id (-1 empty). */
typedef struct tok_vocab_map {
    int32_t *slots; /* (mask + 1) */
    size_t mask;
} tok_vocab_map;

typedef struct tok_merge_slot {
    uint64_t pair; /* left id << 32 | right id; TOK_PAIR_EMPTY when free */
    uint32_t rank; /* line of the merge in tokenizer.json: lower merges first */
    int32_t merged;
} tok_merge_slot;
#define TOK_PAIR_EMPTY UINT64_MAX

typedef struct tok_merge_map {
    tok_merge_slot *slots; /* (mask + 1) */
    size_t mask;
} tok_merge_map;

typedef struct tok_cache tok_cache;

/* One added token from tokenizer.json's added_tokens. */
typedef struct tok_added {
    unsigned char *content; /* NFC form when normalized (that is what it matches) */
    size_t len;
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} tok_added;

/* An id may be both BPE and ADDED (an added token that is also a vocabulary entry). */
enum { TOK_ID_PRESENT = 1, TOK_ID_ADDED = 2, TOK_ID_SPECIAL = 4, TOK_ID_BPE = 8 };

struct kvd_tokenizer {
    int32_t num_ids;              /* one past the largest id */
    uint32_t *token_offset;       /* (num_ids + 1): id's bytes are token_bytes[off[id]..off[id+1]) */
    unsigned char *token_bytes;
    uint8_t *id_flags;            /* (num_ids) TOK_ID_* */
    size_t max_token_len;
    int32_t byte_id[256];         /* id of each single-byte token */
    tok_vocab_map vocab;          /* BPE vocabulary only, bytes -> id */
    tok_merge_map merges;
    bool ignore_merges;           /* a piece found whole in the vocabulary skips merging */
    bool nfc;                     /* normalizer: NFC or none */

    tok_added *added;             /* (num_added) in tokenizer.json's order */
    size_t num_added;
    /* Candidates by first byte, longest first: added_order[added_first[b] .. added_first[b+1]). */
    uint32_t added_first[257];
    uint32_t *added_order;        /* (num_added) indices into added */
    bool any_normalized_added;

    pcre2_code *split_re;         /* pre-tokenizer regex, NULL = one piece per span */
    tok_cache *cache;             /* word -> ids, internally locked */
};

int tok_vocab_map_build(kvd_tokenizer *tok, kvd_error *err);
/* Id of the BPE vocabulary entry spelled by bytes s[0..len), or -1. */
int32_t tok_vocab_lookup(const kvd_tokenizer *tok, const unsigned char *s, size_t len);
int tok_merge_map_init(tok_merge_map *m, size_t num_merges);
/* Records merge (left, right) -> merged at rank; a repeated pair keeps its last rank
 * (as Hugging Face's map does). */
void tok_merge_map_put(tok_merge_map *m, int32_t left, int32_t right, uint32_t rank, int32_t merged);
const tok_merge_slot *tok_merge_lookup(const tok_merge_map *m, int32_t left, int32_t right);

tok_cache *tok_cache_create(void);
void tok_cache_destroy(tok_cache *c);

/* Growable id array that encode fills. */
typedef struct tok_ids {
    int32_t *ids;
    size_t len, cap;
} tok_ids;
int tok_ids_reserve(tok_ids *v, size_t more);

/* Scratch arrays of the merge loop, grown to the longest word seen in one encode call. */
typedef struct tok_bpe_scratch {
    int32_t *sym, *prev, *next; /* (cap) per-byte symbol id and links */
    void *heap;                 /* (3 * cap) candidate merges */
    size_t cap;
} tok_bpe_scratch;
void tok_bpe_scratch_free(tok_bpe_scratch *s);

/* Appends the ids of one pre-tokenized piece (len >= 1 bytes) to out: the cache, or the
 * merge loop by rank (ties to the leftmost pair). KVD_ENOMEM on allocation failure. */
int tok_bpe_piece(const kvd_tokenizer *tok, const unsigned char *piece, size_t len,
                  tok_bpe_scratch *scratch, tok_ids *out);

/* ---- load.c, load_gguf.c: building a tokenizer ---- */

struct cJSON;
/* Builds a tokenizer from a parsed tokenizer.json tree (path names it in messages). */
kvd_tokenizer *tok_load_json_root(const struct cJSON *root, const char *path, kvd_error *err);
/* Builds a tokenizer from a GGUF file's tokenizer.ggml.* keys. */
kvd_tokenizer *tok_load_gguf(const char *path, kvd_error *err);

/* ---- encode.c ---- */

/* NFC of the valid UTF-8 s[0..len): returns 0 with *out = s when NFC changes nothing,
 * 1 with *out a malloc'ed normal form, or KVD_ENOMEM. */
int tok_nfc(const unsigned char *s, size_t len, unsigned char **out, size_t *out_len);

#endif
