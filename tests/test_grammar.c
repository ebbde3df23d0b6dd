/* test_grammar.c - the grammar engine: one test per JSON Schema keyword, regex and
 * GBNF syntax, and the masks against a brute-force oracle (every token tried one by
 * one), rollback and recompute. Needs the Qwen tokenizer ($KVD_TOKENIZER_JSON). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvd/kvd_grammar.h"
#include "kvd/kvd_tokenizer.h"

static kvd_tokenizer *tok;
static kvd_grammar_vocab *voc;
static uint32_t *mask;
static int words;

static int setup(void **state)
{
    (void)state;
    const char *path = getenv("KVD_TOKENIZER_JSON");
    kvd_error err = {0};
    tok = path ? kvd_tokenizer_load(path, &err) : NULL;
    if (!tok) {
        fprintf(stderr, "test_grammar: no tokenizer (%s)\n", path ? err.msg : "KVD_TOKENIZER_JSON unset");
        return -1;
    }
    voc = kvd_grammar_vocab_create(tok, 151936, &err);
    if (!voc) return -1;
    words = kvd_grammar_mask_words(voc);
    mask = malloc((size_t)words * sizeof *mask);
    return mask ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    free(mask);
    kvd_grammar_vocab_destroy(voc);
    kvd_tokenizer_destroy(tok);
    return 0;
}

static bool bit(const uint32_t *m, int32_t id) { return (m[id >> 5] >> (id & 31)) & 1; }

/* Feeds text token by token (as the tokenizer splits it), checking at each step that
 * the mask holds the token exactly when accept takes it and never holds a special
 * or undefined id. True when the whole text is accepted and may end there. */
static bool run_text(kvd_grammar *g, const char *text)
{
    int32_t *ids = NULL;
    int n = kvd_tokenizer_encode(tok, text, strlen(text), false, &ids);
    assert_true(n >= 0);
    kvd_grammar_matcher *m = kvd_grammar_matcher_create(g, NULL);
    assert_non_null(m);
    bool ok = true;
    for (int k = 0; k <= n && ok; k++) {
        assert_int_equal(kvd_grammar_matcher_fill_mask(m, mask, NULL), 0);
        for (int32_t id = 151643; id < 151936; id++) /* special and unused ids */
            if (id >= kvd_tokenizer_vocab_size(tok) || kvd_tokenizer_is_special(tok, id)) assert_false(bit(mask, id));
        if (k == n) {
            ok = kvd_grammar_matcher_can_end(m);
            break;
        }
        bool in = bit(mask, ids[k]);
        int rc = kvd_grammar_matcher_accept(m, ids[k], NULL);
        assert_int_equal(in, rc == 0);
        ok = rc == 0;
    }
    kvd_grammar_matcher_destroy(m);
    free(ids);
    return ok;
}

static kvd_grammar *schema_opts(const char *s, bool any_order)
{
    kvd_error err = {0};
    kvd_grammar_json_options o = {.any_order = any_order};
    kvd_grammar *g = kvd_grammar_compile_json_schema(voc, s, strlen(s), &o, &err);
    if (!g) fprintf(stderr, "compile failed: %s\n", err.msg);
    assert_non_null(g);
    return g;
}

static kvd_grammar *schema(const char *s) { return schema_opts(s, false); }

/* Each text of yes[] is accepted, each of no[] rejected. */
static void check(kvd_grammar *g, const char *const *yes, const char *const *no)
{
    for (const char *const *t = yes; t && *t; t++)
        if (!run_text(g, *t)) fail_msg("rejected: %s", *t);
    for (const char *const *t = no; t && *t; t++)
        if (run_text(g, *t)) fail_msg("accepted: %s", *t);
    kvd_grammar_release(g);
}

static void compile_error(const char *s, int code, const char *word)
{
    kvd_error err = {0};
    kvd_grammar *g = kvd_grammar_compile_json_schema(voc, s, strlen(s), NULL, &err);
    assert_null(g);
    assert_int_equal(err.code, code);
    if (!strstr(err.msg, word)) fail_msg("error '%s' does not name '%s'", err.msg, word);
}

#define L(...) (const char *const[]){__VA_ARGS__, NULL}

static void test_type(void **state)
{
    (void)state;
    check(schema("{\"type\": \"string\"}"), L("\"\"", "\"a b\"", "\"\\u00e9\\n\"", "\"日本\""),
          L("1", "\"a", "'a'", "\"\x01\"", "null"));
    check(schema("{\"type\": \"integer\"}"), L("0", "-12", "1234567890123"), L("01", "1.5", "-", "1e3", "\"1\""));
    check(schema("{\"type\": \"number\"}"), L("0", "-1.5", "2e10", "1.0E-3"), L("1.", ".5", "+1", "01"));
    check(schema("{\"type\": \"boolean\"}"), L("true", "false"), L("True", "1"));
    check(schema("{\"type\": \"null\"}"), L("null"), L("nul", "\"null\""));
    check(schema("{\"type\": [\"string\", \"null\"]}"), L("null", "\"x\""), L("1"));
    check(schema("{}"), L("{\"a\": [1, {\"b\": null}]}", "\"x\"", "-0.5"), L("{a: 1}", "[1,]"));
}

static void test_properties_order(void **state)
{
    (void)state;
    const char *s = "{\"type\": \"object\", \"properties\": {\"b\": {\"type\": \"integer\"}, \"a\": {\"type\": "
                    "\"string\"}}, \"additionalProperties\": false}";
    /* schema order: b before a (required ones are not moved first) */
    check(schema(s), L("{\"b\": 1, \"a\": \"x\"}", "{\"a\": \"x\"}", "{}", "{\"b\": 1}"),
          L("{\"a\": \"x\", \"b\": 1}", "{\"b\": 1, \"b\": 2}"));
    check(schema_opts(s, true), L("{\"a\": \"x\", \"b\": 1}", "{\"b\": 1, \"a\": \"x\"}"),
          L("{\"b\": 1, \"b\": 2}", "{\"a\": 1}"));
}

static void test_required(void **state)
{
    (void)state;
    check(schema("{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}, \"b\": {\"type\": "
                 "\"integer\"}}, \"required\": [\"b\"], \"additionalProperties\": false}"),
          L("{\"b\": 1}", "{\"a\": 2, \"b\": 1}"), L("{}", "{\"a\": 2}"));
    /* a required name outside properties: any value */
    check(schema("{\"type\": \"object\", \"required\": [\"z\"]}"), L("{\"z\": [true]}", "{\"z\": 1, \"y\": 2}"),
          L("{}", "{\"y\": 2}"));
}

static void test_additional_properties(void **state)
{
    (void)state;
    /* default: other members allowed, but never a declared name with a wrong value */
    check(schema("{\"type\": \"object\", \"properties\": {\"ab\": {\"type\": \"integer\"}}}"),
          L("{\"ab\": 1, \"x\": \"y\"}", "{\"a\": \"s\"}", "{\"abc\": \"s\"}", "{\"b\": null}"),
          L("{\"ab\": \"s\"}", "{\"x\": 1, \"ab\": \"s\"}"));
    check(schema("{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}}, "
                 "\"additionalProperties\": {\"type\": \"string\"}}"),
          L("{\"a\": 1, \"x\": \"y\"}"), L("{\"x\": 2}"));
    check(schema("{\"type\": \"object\", \"additionalProperties\": false}"), L("{}", "{ }"), L("{\"a\": 1}"));
    /* one pattern, closed object, no declared name it matches: exact */
    check(schema("{\"type\": \"object\", \"properties\": {\"id\": {\"type\": \"string\"}}, \"patternProperties\": "
                 "{\"^x-[a-z]+$\": {\"type\": \"integer\"}}, \"additionalProperties\": false}"),
          L("{}", "{\"x-ab\": 1, \"id\": \"q\"}", "{\"id\": \"q\", \"x-c\": 2, \"x-d\": 3}"),
          L("{\"y\": 1}", "{\"x-a\": \"s\"}", "{\"x-\": 1}", "{\"id\": 1}"));
    compile_error("{\"type\": \"object\", \"properties\": {\"x-id\": {}}, \"patternProperties\": {\"^x-\": {}}, "
                  "\"additionalProperties\": false}", KVD_EUNSUPPORTED, "patternProperties");
}

static void test_items(void **state)
{
    (void)state;
    check(schema("{\"type\": \"array\", \"items\": {\"type\": \"integer\"}, \"minItems\": 1, \"maxItems\": 3}"),
          L("[1]", "[1, 2, 3]", "[ 1 ,2 ]"), L("[]", "[1, 2, 3, 4]", "[\"a\"]", "[1,]"));
    check(schema("{\"type\": \"array\", \"prefixItems\": [{\"type\": \"string\"}, {\"type\": \"integer\"}], "
                 "\"items\": false}"),
          L("[]", "[\"a\"]", "[\"a\", 1]"), L("[1]", "[\"a\", 1, 2]"));
    check(schema("{\"type\": \"array\", \"prefixItems\": [{\"type\": \"string\"}], \"items\": {\"type\": "
                 "\"boolean\"}, \"minItems\": 2}"),
          L("[\"a\", true]", "[\"a\", true, false]"), L("[\"a\"]", "[\"a\", 1]"));
    /* draft 4 tuple form */
    check(schema("{\"type\": \"array\", \"items\": [{\"type\": \"null\"}], \"additionalItems\": false}"),
          L("[null]", "[]"), L("[null, null]"));
}

static void test_enum_const(void **state)
{
    (void)state;
    check(schema("{\"enum\": [\"red\", 3, null, {\"a\": [1]}]}"), L("\"red\"", "3", "3.0", "null", "{\"a\": [1]}"),
          L("\"Red\"", "4", "{\"a\": [2]}"));
    check(schema("{\"type\": \"string\", \"enum\": [\"x\", 1]}"), L("\"x\""), L("1"));
    check(schema("{\"const\": \"q\\\"uote\"}"), L("\"q\\\"uote\""), L("\"q\""));
}

static void test_any_one_all_of(void **state)
{
    (void)state;
    check(schema("{\"anyOf\": [{\"type\": \"integer\"}, {\"type\": \"string\", \"maxLength\": 2}]}"),
          L("1", "\"ab\""), L("\"abc\"", "null"));
    check(schema("{\"oneOf\": [{\"type\": \"integer\"}, {\"type\": \"boolean\"}]}"), L("1", "true"), L("\"a\""));
    compile_error("{\"oneOf\": [{\"type\": \"integer\"}, {\"type\": \"number\"}]}", KVD_EUNSUPPORTED, "oneOf");
    /* objects told apart by a required member's const, or by a member one side forbids */
    check(schema("{\"oneOf\": [{\"type\": \"object\", \"properties\": {\"kind\": {\"const\": \"a\"}, \"x\": "
                 "{\"type\": \"integer\"}}, \"required\": [\"kind\"]}, {\"type\": \"object\", \"properties\": "
                 "{\"kind\": {\"enum\": [\"b\", \"c\"]}}, \"required\": [\"kind\"], \"additionalProperties\": false}]}"),
          L("{\"kind\": \"a\", \"x\": 1}", "{\"kind\": \"c\"}"), L("{\"kind\": \"d\"}", "{\"kind\": \"b\", \"x\": 1}"));
    check(schema("{\"oneOf\": [{\"type\": \"object\", \"properties\": {\"p\": {}}, \"required\": [\"p\"]}, "
                 "{\"type\": \"object\", \"properties\": {\"q\": {}}, \"additionalProperties\": false}]}"),
          L("{\"p\": 1, \"z\": 2}", "{\"q\": 1}", "{}"), L("{\"z\": 1}"));
    /* the second branch takes the first's negation: objects without p (with p, both match) */
    check(schema("{\"oneOf\": [{\"type\": \"object\", \"required\": [\"p\"]}, {\"type\": \"object\"}]}"),
          L("{}", "{\"q\": 1}"), L("{\"p\": 1}", "1"));
    check(schema("{\"allOf\": [{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}}, "
                 "\"required\": [\"a\"]}, {\"properties\": {\"b\": {\"type\": \"string\"}}, \"required\": [\"b\"]}]}"),
          L("{\"a\": 1, \"b\": \"x\"}", "{\"a\": 1, \"b\": \"x\", \"c\": 0}"), L("{\"a\": 1}", "{\"a\": 1, \"b\": 2}"));
    /* additionalProperties sees only the properties beside it: here neither a nor b
     * may appear at all, so nothing satisfies the schema */
    compile_error("{\"allOf\": [{\"type\": \"object\", \"properties\": {\"a\": {}}, \"required\": [\"a\"]}], "
                  "\"additionalProperties\": false}", KVD_EINVAL, "matches nothing");
    check(schema("{\"allOf\": [{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}}, "
                 "\"additionalProperties\": false}, {\"properties\": {\"b\": {}}}]}"),
          L("{\"a\": 1}", "{}"), L("{\"a\": 1, \"b\": 2}", "{\"c\": 1}"));
    /* anyOf next to other keywords: each branch with them */
    check(schema("{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}, \"b\": {\"type\": "
                 "\"integer\"}}, \"additionalProperties\": false, \"anyOf\": [{\"required\": [\"a\"]}, "
                 "{\"required\": [\"b\"]}]}"),
          L("{\"a\": 1}", "{\"b\": 1}", "{\"a\": 1, \"b\": 2}"), L("{}"));
}

static void test_ref_recursion(void **state)
{
    (void)state;
    const char *s = "{\"$defs\": {\"node\": {\"type\": \"object\", \"properties\": {\"v\": {\"type\": \"integer\"}, "
                    "\"kids\": {\"type\": \"array\", \"items\": {\"$ref\": \"#/$defs/node\"}}}, \"required\": [\"v\"], "
                    "\"additionalProperties\": false}}, \"$ref\": \"#/$defs/node\"}";
    check(schema(s), L("{\"v\": 1}", "{\"v\": 1, \"kids\": [{\"v\": 2, \"kids\": [{\"v\": 3}]}]}"),
          L("{\"v\": 1, \"kids\": [{\"kids\": []}]}", "{\"v\": 1, \"kids\": [{\"v\": \"x\"}]}"));
    check(schema("{\"definitions\": {\"s\": {\"type\": \"string\"}}, \"type\": \"array\", \"items\": {\"$ref\": "
                 "\"#/definitions/s\"}}"),
          L("[\"a\"]"), L("[1]"));
    compile_error("{\"$ref\": \"http://example.com/x.json\"}", KVD_EUNSUPPORTED, "$ref");
}

static void test_lengths(void **state)
{
    (void)state;
    /* code points, not bytes; an escape is one character */
    check(schema("{\"type\": \"string\", \"minLength\": 2, \"maxLength\": 3}"),
          L("\"ab\"", "\"abc\"", "\"éé\"", "\"a\\n\""), L("\"a\"", "\"abcd\"", "\"é\""));
}

static void test_pattern_format(void **state)
{
    (void)state;
    check(schema("{\"type\": \"string\", \"pattern\": \"^[A-Z]{2}-\\\\d{3}$\"}"), L("\"AB-123\""),
          L("\"AB-12\"", "\"ab-123\"", "\"xAB-123\""));
    /* lengths the pattern already implies are fine; others are refused */
    check(schema("{\"type\": \"string\", \"pattern\": \"^([0-9]{5}|[a-z]{2,3})$\", \"minLength\": 2, \"maxLength\": 5}"),
          L("\"12345\"", "\"ab\""), L("\"1234\"", "\"abcd\""));
    compile_error("{\"type\": \"string\", \"pattern\": \"^[0-9]{5}$\", \"maxLength\": 4}", KVD_EINVAL, "matches nothing");
    compile_error("{\"type\": \"string\", \"pattern\": \"^[0-9]+\", \"maxLength\": 9}", KVD_EUNSUPPORTED, "maxLength");
    /* unanchored: search semantics */
    check(schema("{\"type\": \"string\", \"pattern\": \"ab+c\"}"), L("\"xxabbcyy\"", "\"abc\""), L("\"ac\"", "\"\""));
    check(schema("{\"type\": \"string\", \"pattern\": \"^a\\\"b\"}"), L("\"a\\\"b\"", "\"a\\\"bc\""), L("\"ab\""));
    check(schema("{\"type\": \"string\", \"format\": \"date\"}"), L("\"2024-02-29\"", "\"2023-12-31\""),
          L("\"2023-02-29\"", "\"2023-04-31\"", "\"2023-1-01\""));
    check(schema("{\"type\": \"string\", \"format\": \"date-time\"}"),
          L("\"2024-01-02T03:04:05Z\"", "\"2024-01-02T03:04:05.123+05:30\""),
          L("\"2024-01-02 03:04:05Z\"", "\"2024-01-02T24:00:00Z\"", "\"2024-01-02T03:04:05\""));
    check(schema("{\"type\": \"string\", \"format\": \"time\"}"), L("\"23:59:59Z\""), L("\"23:59\""));
    check(schema("{\"type\": \"string\", \"format\": \"uuid\"}"), L("\"123e4567-e89b-12d3-a456-426614174000\""),
          L("\"123e4567e89b12d3a456426614174000\""));
    check(schema("{\"type\": \"string\", \"format\": \"email\"}"), L("\"a.b@example.com\""),
          L("\"a.b.example.com\"", "\"@x.y\""));
    check(schema("{\"type\": \"string\", \"format\": \"uri\"}"),
          L("\"https://example.com:8080/a/b?x=1&y#top\"", "\"mailto:a@b.c\"", "\"urn:isbn:0451450523\""),
          L("\"not a uri\"", "\"http://exa mple.com\"", "\"//x\"", "\"http://x/%zz\""));
    compile_error("{\"type\": \"string\", \"format\": \"hostname\"}", KVD_EUNSUPPORTED, "hostname");
    /* a format no draft defines is an annotation: any string */
    check(schema("{\"type\": \"string\", \"format\": \"int32\"}"), L("\"x\""), L("1"));
}

/* minLength/maxLength cut the one repeated part of a pattern (or refuse) */
static void test_pattern_lengths(void **state)
{
    (void)state;
    check(schema("{\"type\": \"string\", \"pattern\": \"^[a-z]+$\", \"maxLength\": 3}"), L("\"a\"", "\"abc\""),
          L("\"\"", "\"abcd\"", "\"ab1\""));
    /* search semantics: the free tail after the anchored head is what is cut */
    check(schema("{\"type\": \"string\", \"pattern\": \"^ab\", \"minLength\": 4, \"maxLength\": 5}"),
          L("\"abxy\"", "\"abxyz\"", "\"ab\\n\\u0001\""), L("\"abx\"", "\"abxyzw\"", "\"xabcd\""));
    /* a repeated group of fixed length: whole repetitions only */
    check(schema("{\"type\": \"string\", \"pattern\": \"^(ab){1,4}$\", \"minLength\": 3, \"maxLength\": 7}"),
          L("\"abab\"", "\"ababab\""), L("\"ab\"", "\"abababab\""));
    /* alternatives are cut one by one, and code points are counted, not bytes */
    check(schema("{\"type\": \"string\", \"pattern\": \"^x+$|^é+$\", \"maxLength\": 2}"), L("\"x\"", "\"éé\""),
          L("\"xxx\"", "\"ééé\""));
    check(schema("{\"type\": \"string\", \"format\": \"date\", \"maxLength\": 10}"), L("\"2024-02-29\""), L("\"x\""));
    compile_error("{\"type\": \"string\", \"pattern\": \"^[a-z]+[0-9]+$\", \"maxLength\": 5}", KVD_EUNSUPPORTED,
                  "maxLength");
    compile_error("{\"type\": \"string\", \"pattern\": \"abc\", \"maxLength\": 5}", KVD_EUNSUPPORTED, "maxLength");
    compile_error("{\"type\": \"string\", \"format\": \"email\", \"maxLength\": 50}", KVD_EUNSUPPORTED, "maxLength");
}

static void test_not(void **state)
{
    (void)state;
    check(schema("{\"type\": \"string\", \"not\": {\"enum\": [\"a\", \"ab\", \"q\\\"\"]}}"),
          L("\"\"", "\"b\"", "\"abc\"", "\"aa\"", "\"a\\n\"", "\"q\"", "\"q\\\"x\"", "\"é\""),
          L("\"a\"", "\"ab\"", "\"q\\\"\"", "1"));
    /* lengths beside the excluded strings */
    check(schema("{\"type\": \"string\", \"minLength\": 1, \"maxLength\": 3, \"not\": {\"enum\": [\"ab\", \"x\"]}}"),
          L("\"a\"", "\"abc\"", "\"b\"", "\"xé\""), L("\"\"", "\"ab\"", "\"x\"", "\"abcd\""));
    check(schema("{\"not\": {\"const\": null}}"), L("1", "\"x\"", "{}"), L("null"));
    check(schema("{\"type\": [\"boolean\", \"string\"], \"not\": {\"enum\": [true, \"x\"]}}"), L("false", "\"y\""),
          L("true", "\"x\""));
    check(schema("{\"type\": \"object\", \"not\": {\"required\": [\"a\"]}}"), L("{}", "{\"b\": 1}"),
          L("{\"a\": 1}", "{\"b\": 1, \"a\": 2}"));
    /* required holds for every non-object, so its negation only for objects */
    check(schema("{\"not\": {\"required\": [\"a\", \"b\"]}}"), L("{\"a\": 1}", "{\"b\": 1}", "{}"),
          L("{\"a\": 1, \"b\": 2}", "1", "\"x\""));
    check(schema("{\"not\": {\"not\": {\"type\": \"integer\"}}}"), L("1", "-7"), L("\"x\"", "1.5"));
    check(schema("{\"not\": {\"anyOf\": [{\"type\": \"null\"}, {\"enum\": [\"x\"]}]}}"), L("\"y\"", "1"),
          L("null", "\"x\""));
    /* enum/const beside keywords kvd checks literal by literal */
    check(schema("{\"enum\": [1, 2, 3, \"a\"], \"not\": {\"enum\": [2]}}"), L("1", "3", "\"a\""), L("2"));
    check(schema("{\"enum\": [\"a\", \"bb\", \"ccc\"], \"pattern\": \"^.{2,}$\"}"), L("\"bb\"", "\"ccc\""), L("\"a\""));
    /* keywords of another type than a literal's hold for it: patternProperties (not
     * compilable here) says nothing about "a" or 5 */
    check(schema("{\"enum\": [\"a\", 2, 5], \"minimum\": 3, \"patternProperties\": {\"^a\": {\"type\": \"integer\"}}}"),
          L("\"a\"", "5"), L("2", "\"b\""));
    /* an excluded string the pattern never matches changes nothing */
    check(schema("{\"type\": \"string\", \"pattern\": \"^a\", \"not\": {\"enum\": [\"b\"]}}"), L("\"a\"", "\"ab\""),
          L("\"b\"", "\"c\""));
    compile_error("{\"type\": \"string\", \"pattern\": \"^a\", \"not\": {\"enum\": [\"ab\"]}}", KVD_EUNSUPPORTED, "not");
    /* not allOf: one of them fails; string lengths: too short or too long */
    check(schema("{\"not\": {\"allOf\": [{\"type\": \"string\"}, {\"maxLength\": 2}]}}"), L("1", "\"abc\"", "null"),
          L("\"ab\"", "\"\""));
    check(schema("{\"type\": \"string\", \"not\": {\"minLength\": 2, \"maxLength\": 3}}"), L("\"a\"", "\"abcd\"", "\"\""),
          L("\"ab\"", "\"abc\"", "1"));
    compile_error("{\"type\": \"number\", \"not\": {\"enum\": [1]}}", KVD_EUNSUPPORTED, "not");
    compile_error("{\"not\": {\"minimum\": 3}}", KVD_EUNSUPPORTED, "not");
}

static void test_one_of_overlap(void **state)
{
    (void)state;
    check(schema("{\"type\": \"object\", \"oneOf\": [{\"required\": [\"a\"]}, {\"required\": [\"b\"]}]}"),
          L("{\"a\": 1}", "{\"b\": 1}", "{\"b\": 1, \"c\": 2}"), L("{\"a\": 1, \"b\": 2}", "{}", "{\"c\": 1}"));
    /* a branch the other contains can never be the only match */
    check(schema("{\"oneOf\": [{\"required\": [\"a\"]}, {\"required\": [\"a\", \"b\"]}]}"), L("{\"a\": 1}"),
          L("{\"a\": 1, \"b\": 1}", "{\"b\": 1}", "1"));
    /* a literal branch: the strings leave it out, it keeps what the strings do not take */
    check(schema("{\"oneOf\": [{\"type\": \"string\"}, {\"enum\": [\"x\", \"y\", 1]}]}"), L("\"z\"", "1", "\"\""),
          L("\"x\"", "\"y\"", "2"));
    compile_error("{\"oneOf\": [{\"type\": \"integer\"}, {\"type\": \"number\"}]}", KVD_EUNSUPPORTED, "oneOf");
    /* object shapes: a branch fails where a required member is missing or a declared one
     * has a value its schema refuses; {} and {"a": null} match both, so neither */
    check(schema("{\"oneOf\": [{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}}}, "
                 "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"string\"}}}]}"),
          L("{\"a\": 1}", "{\"a\": \"x\", \"b\": 2}"), L("{}", "{\"b\": 1}", "{\"a\": null}", "[]"));
    /* (members in any order: each branch declares its own members first) */
    check(schema_opts("{\"type\": \"object\", \"oneOf\": [{\"properties\": {\"a\": {\"type\": \"boolean\"}}, \"required\": [\"a\"]}, "
                      "{\"properties\": {\"b\": {\"type\": \"string\"}}, \"required\": [\"b\"]}]}", true),
          L("{\"a\": true}", "{\"b\": \"x\"}", "{\"a\": true, \"b\": 2}", "{\"a\": \"x\", \"b\": \"y\"}"),
          L("{\"a\": true, \"b\": \"x\"}", "{}", "{\"a\": \"x\"}"));
    /* not integer, where numbers are allowed, would be a number with a fraction: refused */
    compile_error("{\"type\": \"object\", \"oneOf\": [{\"properties\": {\"a\": {\"type\": \"integer\"}}, \"required\": [\"a\"]}, "
                  "{\"properties\": {\"b\": {\"type\": \"string\"}}, \"required\": [\"b\"]}]}",
                  KVD_EUNSUPPORTED, "oneOf");
    compile_error("{\"oneOf\": [{\"type\": \"object\", \"minProperties\": 1}, {\"type\": \"object\", \"maxProperties\": 3}]}",
                  KVD_EUNSUPPORTED, "oneOf");
}

static void test_pattern_properties(void **state)
{
    (void)state;
    /* a pattern every key matches: every member passes it, additionalProperties never applies */
    check(schema("{\"type\": \"object\", \"properties\": {\"a\": {\"minimum\": 0}}, \"patternProperties\": "
                 "{\".*\": {\"type\": \"integer\"}}, \"additionalProperties\": false}"),
          L("{\"a\": 1, \"b\": 2}", "{}"), L("{\"a\": -1}", "{\"b\": \"x\"}", "{\"a\": 1.5}"));
    /* a pattern whose schema takes everything, beside open additionalProperties */
    check(schema("{\"type\": \"object\", \"patternProperties\": {\"^x-\": {}}}"), L("{\"x-a\": 1, \"b\": \"c\"}"),
          L("[]"));
    check(schema("{\"type\": \"object\", \"patternProperties\": {\"^x-\": {}}, \"additionalProperties\": false}"),
          L("{\"x-a\": 1}", "{}"), L("{\"b\": 1}"));
}

static void test_integer_bounds(void **state)
{
    (void)state;
    const int ranges[][2] = {{-37, 1234}, {0, 9}, {10, 10}, {-5, -3}, {7, 100000}};
    for (size_t r = 0; r < sizeof ranges / sizeof *ranges; r++) {
        char s[200];
        snprintf(s, sizeof s, "{\"type\": \"integer\", \"minimum\": %d, \"maximum\": %d}", ranges[r][0], ranges[r][1]);
        kvd_grammar *g = schema(s);
        for (int v = -200; v <= 2000; v += (v > 150 ? 37 : 1)) {
            char t[32];
            snprintf(t, sizeof t, "%d", v);
            bool in = v >= ranges[r][0] && v <= ranges[r][1];
            if (run_text(g, t) != in) fail_msg("%s: %d %s", s, v, in ? "rejected" : "accepted");
        }
        kvd_grammar_release(g);
    }
    check(schema("{\"type\": \"integer\", \"exclusiveMinimum\": 0}"), L("1", "99999999"), L("0", "-1"));
    check(schema("{\"type\": \"integer\", \"maximum\": -10}"), L("-10", "-11", "-100000"), L("-9", "0", "5"));
    check(schema("{\"type\": \"number\", \"minimum\": 0}"), L("0", "0.5", "1e3"), L("-1", "-0.5"));
    compile_error("{\"type\": \"number\", \"minimum\": 0.5}", KVD_EUNSUPPORTED, "minimum");
    /* numbers between whole bounds: every fraction inside, only zeros at a bound */
    const char *nb[] = {"{\"type\": \"number\", \"minimum\": -2, \"maximum\": 3}",
                        "{\"type\": \"number\", \"exclusiveMinimum\": -2, \"exclusiveMaximum\": 0}",
                        "{\"type\": \"number\", \"minimum\": 1}", "{\"type\": \"number\", \"maximum\": -1}"};
    const double nlo[] = {-2, -2, 1, -1e300}, nhi[] = {3, 0, 1e300, -1};
    const bool nex[] = {false, true, false, false};
    const char *texts[] = {"-3", "-2.5", "-2", "-2.0", "-1.99", "-1", "-0.5", "-0", "0", "0.0", "0.25", "1", "2.999",
                           "3", "3.0", "3.001", "4", "12.5"};
    for (size_t k = 0; k < 4; k++) {
        kvd_grammar *g = schema(nb[k]);
        for (size_t t = 0; t < sizeof texts / sizeof *texts; t++) {
            double x = strtod(texts[t], NULL);
            bool in = nex[k] ? x > nlo[k] && x < nhi[k] : x >= nlo[k] && x <= nhi[k];
            if (run_text(g, texts[t]) != in) fail_msg("%s: %s %s", nb[k], texts[t], in ? "rejected" : "accepted");
        }
        kvd_grammar_release(g);
    }
}

static void test_properties_count(void **state)
{
    (void)state;
    check(schema("{\"type\": \"object\", \"minProperties\": 1, \"maxProperties\": 2}"),
          L("{\"a\": 1}", "{\"a\": 1, \"b\": 2}"), L("{}", "{\"a\": 1, \"b\": 2, \"c\": 3}"));
}

static void test_unsupported(void **state)
{
    (void)state;
    compile_error("{\"not\": {\"enum\": [1]}}", KVD_EUNSUPPORTED, "not");
    compile_error("{\"type\": \"number\", \"not\": {\"type\": \"integer\"}}", KVD_EUNSUPPORTED, "not");
    check(schema("{\"not\": {\"type\": [\"string\", \"object\"]}}"), L("1", "null", "[\"a\"]"), L("\"a\"", "{}"));
    check(schema("{\"type\": \"integer\", \"not\": false}"), L("7"), L("\"7\""));
    compile_error("{\"not\": {}}", KVD_EINVAL, "matches nothing");
    compile_error("{\"type\": \"array\", \"uniqueItems\": true}", KVD_EUNSUPPORTED, "uniqueItems");
    check(schema("{\"type\": \"array\", \"uniqueItems\": true, \"maxItems\": 1}"), L("[]", "[1]"), L("[1, 2]"));
    compile_error("{\"type\": \"object\", \"patternProperties\": {\"^a\": {\"type\": \"integer\"}}}", KVD_EUNSUPPORTED,
                  "patternProperties");
    compile_error("{\"type\": \"integer\", \"multipleOf\": 3}", KVD_EUNSUPPORTED, "multipleOf");
    compile_error("{\"type\": \"strin\"}", KVD_EINVAL, "strin");
    compile_error("{\"type\": ", KVD_EINVAL, "JSON");
}

static void test_regex(void **state)
{
    (void)state;
    kvd_error err = {0};
    const char *re = "(ab|c)+x{2}[^a-z]?\\d*";
    kvd_grammar *g = kvd_grammar_compile_regex(voc, re, strlen(re), &err);
    assert_non_null(g);
    check(g, L("abxx", "cabcxx", "abxxZ12", "cxx9"), L("xx", "abx", "abxxa", "abxxZZ"));
    g = kvd_grammar_compile_regex(voc, "a(?=b)", 6, &err);
    assert_null(g);
    assert_int_equal(err.code, KVD_EUNSUPPORTED);
}

static void test_choice(void **state)
{
    (void)state;
    const char *const ch[] = {"yes", "no", "maybe so"};
    kvd_grammar *g = kvd_grammar_compile_choice(voc, ch, 3, NULL);
    assert_non_null(g);
    check(g, L("yes", "no", "maybe so"), L("maybe", "yesno", "Yes"));
}

static void test_gbnf(void **state)
{
    (void)state;
    const char *gb = "# a list of pairs\n"
                     "root ::= \"{\" pair (\",\" ws pair)* \"}\"\n"
                     "pair ::= [a-z]+ \":\" ( \"yes\" | \"no\" )\n"
                     "ws   ::= [ \\t]?\n";
    kvd_error err = {0};
    kvd_grammar *g = kvd_grammar_compile_gbnf(voc, gb, strlen(gb), &err);
    if (!g) fail_msg("%s", err.msg);
    check(g, L("{a:yes}", "{ab:no, c:yes}"), L("{a:yes,}", "{A:yes}", "{a:maybe}"));
    const char *bad[][2] = {{"root ::= x\n", "x"}, {"root ::= root \"a\" | \"b\"\n", "left-recursive"},
                            {"root ::= \"a\n", "unterminated"}, {"x ::= \"a\"\n", "root"}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        g = kvd_grammar_compile_gbnf(voc, bad[i][0], strlen(bad[i][0]), &err);
        assert_null(g);
        if (!strstr(err.msg, bad[i][1])) fail_msg("'%s' for %s", err.msg, bad[i][0]);
    }
}

/* The mask at each state equals trying every token: accept, check, roll back. */
static void oracle_check(kvd_grammar *g, const char *prefix)
{
    int32_t *ids = NULL;
    int n = kvd_tokenizer_encode(tok, prefix, strlen(prefix), false, &ids);
    kvd_grammar_matcher *m = kvd_grammar_matcher_create(g, NULL);
    for (int k = 0; k <= n; k++) {
        assert_int_equal(kvd_grammar_matcher_fill_mask(m, mask, NULL), 0);
        for (int32_t id = 0; id < 151936; id++) {
            bool ok = kvd_grammar_matcher_accept(m, id, NULL) == 0;
            if (ok) assert_int_equal(kvd_grammar_matcher_rollback(m, 1), 0);
            if (ok != bit(mask, id)) fail_msg("%s after %d tokens: id %d mask %d accept %d", prefix, k, id, bit(mask, id), ok);
        }
        if (k < n) assert_int_equal(kvd_grammar_matcher_accept(m, ids[k], NULL), 0);
    }
    kvd_grammar_matcher_destroy(m);
    free(ids);
}

static void test_mask_oracle(void **state)
{
    (void)state;
    kvd_grammar *g = schema("{\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\", \"maxLength\": 5},"
                            " \"n\": {\"type\": \"integer\", \"minimum\": 3, \"maximum\": 250}}, \"required\": [\"n\"]}");
    oracle_check(g, "{\"name\": \"ab");
    oracle_check(g, "{\"n\": 2");
    kvd_grammar_release(g);
}

/* Rolled back and replayed, or replayed from scratch by a new matcher (a preempted or
 * prefix-cached sequence), the masks are the same bits. */
static void test_rollback_recompute(void **state)
{
    (void)state;
    kvd_grammar *g = schema("{\"type\": \"array\", \"items\": {\"type\": \"object\", \"properties\": {\"k\": {\"enum\": "
                            "[\"a\", \"b\"]}}}, \"maxItems\": 4}");
    const char *text = "[{\"k\": \"a\"}, {\"k\": \"b\", \"z\": [1, 2]}, {}]";
    int32_t *ids = NULL;
    int n = kvd_tokenizer_encode(tok, text, strlen(text), false, &ids);
    uint32_t *saved = malloc((size_t)(n + 1) * words * sizeof *saved);
    kvd_grammar_matcher *m = kvd_grammar_matcher_create(g, NULL);
    for (int k = 0; k <= n; k++) {
        assert_int_equal(kvd_grammar_matcher_fill_mask(m, saved + (size_t)k * words, NULL), 0);
        if (k < n) assert_int_equal(kvd_grammar_matcher_accept(m, ids[k], NULL), 0);
    }
    assert_true(kvd_grammar_matcher_is_complete(m));
    assert_int_equal(kvd_grammar_matcher_rollback(m, (size_t)n / 2), 0);
    for (int k = n - n / 2; k <= n; k++) {
        assert_int_equal(kvd_grammar_matcher_fill_mask(m, mask, NULL), 0);
        assert_memory_equal(mask, saved + (size_t)k * words, (size_t)words * sizeof *mask);
        if (k < n) assert_int_equal(kvd_grammar_matcher_accept(m, ids[k], NULL), 0);
    }
    kvd_grammar_matcher *fresh = kvd_grammar_matcher_create(g, NULL);
    for (int k = 0; k <= n; k++) {
        assert_int_equal(kvd_grammar_matcher_fill_mask(fresh, mask, NULL), 0);
        assert_memory_equal(mask, saved + (size_t)k * words, (size_t)words * sizeof *mask);
        if (k < n) assert_int_equal(kvd_grammar_matcher_accept(fresh, ids[k], NULL), 0);
    }
    assert_int_equal(kvd_grammar_matcher_accept(fresh, ids[0], NULL), KVD_EINVAL); /* complete: nothing more */
    kvd_grammar_matcher_destroy(fresh);
    kvd_grammar_matcher_destroy(m);
    kvd_grammar_release(g);
    free(saved);
    free(ids);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type),
        cmocka_unit_test(test_properties_order),
        cmocka_unit_test(test_required),
        cmocka_unit_test(test_additional_properties),
        cmocka_unit_test(test_items),
        cmocka_unit_test(test_enum_const),
        cmocka_unit_test(test_any_one_all_of),
        cmocka_unit_test(test_ref_recursion),
        cmocka_unit_test(test_lengths),
        cmocka_unit_test(test_pattern_format),
        cmocka_unit_test(test_pattern_lengths),
        cmocka_unit_test(test_not),
        cmocka_unit_test(test_one_of_overlap),
        cmocka_unit_test(test_pattern_properties),
        cmocka_unit_test(test_integer_bounds),
        cmocka_unit_test(test_properties_count),
        cmocka_unit_test(test_unsupported),
        cmocka_unit_test(test_regex),
        cmocka_unit_test(test_choice),
        cmocka_unit_test(test_gbnf),
        cmocka_unit_test(test_mask_oracle),
        cmocka_unit_test(test_rollback_recompute),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
