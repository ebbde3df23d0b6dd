/* grammar_internal.h - the one representation every front end (JSON Schema, regex,
 * GBNF) compiles to, the builder the front ends use, and the compiled form the
 * matcher runs.
 *
 * A grammar is a set of rules; a rule is a list of alternatives; an alternative is a
 * sequence of elements. An element is a byte set, a reference to a rule, or an object
 * (a JSON object's members, see below), each repeated between min and max times.
 * Repetition is a counter in the matcher's frame, not recursion, so a long string or
 * array never grows the matcher's stack and its states repeat (which the mask cache
 * relies on).
 */
#ifndef KVD_GRAMMAR_INTERNAL_H
#define KVD_GRAMMAR_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_grammar.h"

#define GR_INF UINT32_MAX   /* max of an unbounded repetition */
#define GR_NONE UINT32_MAX  /* no rule */
/* An object's state keeps one bit per declared member (any-order mode) below this. */
#define GR_OBJ_MAX_MEMBERS 56

enum { EL_CHARSET = 0, EL_RULE = 1, EL_END = 2, EL_OBJECT = 3 };

typedef struct gr_elem {
    uint8_t kind;
    uint32_t ref;  /* charset index, rule index or object index */
    uint32_t min, max;
} gr_elem;

typedef struct gr_bytes {  /* a set of bytes */
    uint64_t w[4];
} gr_bytes;

static inline bool gr_bytes_has(const gr_bytes *s, unsigned b) { return (s->w[b >> 6] >> (b & 63)) & 1; }
static inline void gr_bytes_add(gr_bytes *s, unsigned b) { s->w[b >> 6] |= 1ull << (b & 63); }
static inline void gr_bytes_add_range(gr_bytes *s, unsigned lo, unsigned hi)
{
    for (unsigned b = lo; b <= hi; b++) gr_bytes_add(s, b);
}

/* A JSON object's members, matched in any order (or in declaration order) with each
 * declared member at most once, required ones before the closing brace. The frame's
 * state is: bits 0..55 the declared members seen, bits 56..63 the extra members
 * (capped at 255). The rules are the member alternatives: `first` has no leading
 * comma, `next` starts with `ws "," ws`. */
typedef struct gr_object {
    uint32_t num_members;
    uint32_t *first_rule, *next_rule; /* num_members each */
    uint64_t required;                /* bit per declared member */
    uint32_t extra_first, extra_next; /* GR_NONE: no other members */
    uint32_t min_members, max_members;
    bool ordered;
} gr_object;

/* --- builder ---------------------------------------------------------------- */

typedef struct gr_seq {  /* an alternative under construction */
    gr_elem *el;
    size_t n, cap;
} gr_seq;

typedef struct gr_rule {
    char *name;
    uint32_t first_alt, num_alts; /* into the builder's alternative list after finish */
    bool lexical; /* a token-level rule (string, number, literal): see the mask cache */
} gr_rule;

typedef struct gr_builder {
    gr_rule *rules;
    size_t num_rules, cap_rules;
    /* alternatives in the order added; alt_rule[i] names the owner */
    gr_seq *alts;
    uint32_t *alt_rule;
    size_t num_alts, cap_alts;
    gr_bytes *sets;
    size_t num_sets, cap_sets;
    gr_object *objects;
    size_t num_objects, cap_objects;
    bool oom;
    kvd_error *err;
    int failed; /* first error code (0: none) */
} gr_builder;

void gr_builder_init(gr_builder *b, kvd_error *err);
void gr_builder_deinit(gr_builder *b);
uint32_t gr_rule_new(gr_builder *b, const char *name, bool lexical);
/* Appends seq as an alternative of rule and takes its elements (seq is reset). */
void gr_rule_add_alt(gr_builder *b, uint32_t rule, gr_seq *seq);
void gr_seq_free(gr_seq *s);
void gr_seq_push(gr_builder *b, gr_seq *s, gr_elem e);
void gr_seq_bytes(gr_builder *b, gr_seq *s, const gr_bytes *set, uint32_t min, uint32_t max);
void gr_seq_byte(gr_builder *b, gr_seq *s, unsigned byte);
void gr_seq_lit(gr_builder *b, gr_seq *s, const char *text, size_t n);
void gr_seq_rule(gr_builder *b, gr_seq *s, uint32_t rule, uint32_t min, uint32_t max);
/* A rule with one alternative made of one literal. */
uint32_t gr_rule_lit(gr_builder *b, const char *name, const char *text, size_t n);
/* Adds an object descriptor (takes the arrays) and returns its index. */
uint32_t gr_object_add(gr_builder *b, gr_object *obj);
/* Records the first error (later ones are dropped). Returns code. */
int gr_fail(gr_builder *b, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Decodes the code point at *p (before end) and moves *p past it; a byte that does
 * not start a whole sequence is taken alone. */
uint32_t gr_utf8_next(const char **p, const char *end);
/* UTF-8 encodes one code point (<= 0x10FFFF) into out; returns its length. */
int gr_utf8_encode(uint32_t cp, char out[4]);
/* Adds to rule alternatives matching exactly the UTF-8 encodings of [lo, hi]. */
void gr_utf8_range(gr_builder *b, uint32_t rule, uint32_t lo, uint32_t hi);

/* --- compiled grammar -------------------------------------------------------- */

typedef struct gr_ci gr_ci; /* one context-independent mask entry, see matcher.c */
struct gr_ci_slot;
struct gr_shared_ci;
void gr_ci_free(gr_ci *c);

struct kvd_grammar {
    const kvd_grammar_vocab *vocab;
    gr_elem *el;           /* every alternative's elements, each followed by EL_END */
    size_t num_el;
    uint32_t *alt_start;   /* element index of each alternative's first element */
    uint32_t *rule_alt0, *rule_nalts; /* per rule: first alternative and count */
    uint8_t *rule_lexical;
    uint32_t *el_rule;     /* per element: the rule whose alternative holds it */
    size_t num_rules;
    gr_bytes *sets;
    size_t num_sets;
    gr_object *objects;
    size_t num_objects;
    uint32_t root;
    /* The mask cache: context-independent token sets per leaf frame chain, shared by
     * every matcher of this grammar (one lock; built lazily). */
    pthread_mutex_t lock;
    struct gr_space *ci_space; /* frames of the cache's trie walks */
    struct gr_ci_slot *ci_table;
    size_t ci_cap, ci_count;
    _Atomic int refs;
};

/* Frees the mask cache (matcher.c). */
void gr_grammar_free_cache(kvd_grammar *g);

/* Turns the builder's rules into a grammar rooted at root (checks left recursion and
 * unproductive rules). Consumes the builder either way. */
kvd_grammar *gr_finish(gr_builder *b, const kvd_grammar_vocab *vocab, uint32_t root, kvd_error *err);

/* --- vocabulary ------------------------------------------------------------- */

struct kvd_grammar_vocab {
    int num_ids;        /* mask width: the model's vocabulary (>= tokenizer's) */
    int num_words;      /* uint32 words per mask */
    /* token bytes: bytes[off[id] .. off[id+1]) ; empty for special/unassigned ids */
    uint8_t *bytes;
    uint32_t *off;
    /* trie in depth-first order: node i has byte, token (-1: none), and end (one past
     * its subtree). Node 0 is the root. Each token id appears at one node; ids with the
     * same bytes are chained through same_next (node_dup says which nodes have such a
     * chain, so the mask walk reads same_next, in id order, only there). */
    uint8_t *node_byte;
    int32_t *node_token;
    uint32_t *node_end;
    uint16_t *node_depth;
    int32_t *same_next;
    uint8_t *node_dup; /* 1: the node's token has same-byte siblings in same_next */
    size_t num_nodes;
    int max_token_len;
    /* mask cache entries shared by every grammar (lexical keys), see matcher.c */
    pthread_mutex_t lock;
    struct gr_shared_ci *shared;
    size_t shared_cap, shared_count;
};

/* Frees the vocabulary's shared mask cache (matcher.c). */
void gr_vocab_free_shared(kvd_grammar_vocab *v);

/* Regex (Python/ECMAScript subset) -> a rule. json_string: the text is the inside of a
 * JSON string (characters escaped as JSON requires), else raw UTF-8. anchored: match
 * the whole text (guided_regex); else JSON Schema's search semantics. min_len/max_len
 * (may be NULL): the shortest and longest texts it matches in code points (UINT64_MAX:
 * unbounded), tracked in search mode only (else 0 and UINT64_MAX). */
uint32_t gr_regex(gr_builder *b, const char *re, size_t len, bool json_string, bool anchored, uint64_t *min_len,
                  uint64_t *max_len);
/* gr_regex (json_string) cut to the texts of min_len..max_len code points (max_len
 * UINT64_MAX: unbounded). *exact is false when kvd cannot cut it exactly (every
 * alternative must be fixed-length atoms around at most one repeated fixed-length
 * unit); the rule is then not to be used. */
uint32_t gr_regex_clipped(gr_builder *b, const char *re, size_t len, bool anchored, uint64_t min_len,
                          uint64_t max_len, bool *exact);
/* Whether grammar g matches the whole of text: 1 yes, 0 no, negative on no memory. */
int gr_accepts_text(const kvd_grammar *g, const char *text, size_t len);
/* Whether JSON Schema pattern re finds a match in text (JSON string text, escaped as
 * kvd writes it): 1 yes, 0 no, negative when re does not compile. */
int gr_regex_search(const kvd_grammar_vocab *v, const char *re, const char *text, size_t len);

#endif
