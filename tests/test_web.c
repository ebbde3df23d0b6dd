/* test_web.c - the embedded pages and the GET /v1/kv document (server/web.c).
 *
 * The pages must be embedded byte for byte as they are in server/web/ (read through
 * $KVD_SOURCE_ROOT), each at its URL with its Content-Type. The KV document is built
 * from a hand-made snapshot and compared as exact JSON text, so a renamed or
 * missing field, a miscounted state or a nested "sequences" object all fail.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "test_files.h"

#include "web.h"

static char *read_source_file(const char *rel, size_t *len)
{
    const char *root = getenv("KVD_SOURCE_ROOT");
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", root ? root : ".", rel);
    return test_must_read_file(path, len);
}

static void test_pages_embedded_verbatim(void **state)
{
    (void)state;
    static const struct {
        const char *url, *file, *type;
    } pages[] = {
        {"/", "server/web/index.html", "text/html; charset=utf-8"},
        {"/kv", "server/web/kv.html", "text/html; charset=utf-8"},
        {"/kvd.css", "server/web/kvd.css", "text/css; charset=utf-8"},
        {"/chat.js", "server/web/chat.js", "text/javascript; charset=utf-8"},
        {"/kv.js", "server/web/kv.js", "text/javascript; charset=utf-8"},
    };
    assert_int_equal(kvd_web_num_assets, sizeof pages / sizeof pages[0]);
    for (size_t i = 0; i < sizeof pages / sizeof pages[0]; i++) {
        const kvd_web_asset *a = kvd_web_find(pages[i].url);
        assert_non_null(a);
        assert_string_equal(a->path, pages[i].url);
        assert_string_equal(a->content_type, pages[i].type);
        size_t len;
        char *want = read_source_file(pages[i].file, &len);
        assert_int_equal(a->len, len);
        assert_memory_equal(a->data, want, len);
        free(want);
    }
}

static void test_find_exact_paths_only(void **state)
{
    (void)state;
    assert_null(kvd_web_find(NULL));
    assert_null(kvd_web_find(""));
    assert_null(kvd_web_find("/index.html"));
    assert_null(kvd_web_find("/kv.html"));
    assert_null(kvd_web_find("/kv/"));
    assert_null(kvd_web_find("/KV"));
    assert_null(kvd_web_find("/v1/kv"));
    assert_non_null(kvd_web_find("/kv"));
}

static kvd_engine_stats sample_stats(void)
{
    kvd_engine_stats st;
    memset(&st, 0, sizeof st);
    st.num_running = 2;
    st.num_waiting = 1;
    st.num_preemptions = 4;
    /* Pool-wide block counts deliberately disagree with the snapshot below: the
     * document must count them from the states it shows. */
    st.kv.blocks_total = 99;
    st.kv.blocks_used = 99;
    st.kv.tokens_stored = 41;
    st.kv.bytes_wasted = 28672;
    st.kv.block_bytes = 4096;
    st.kv.dtype = KVD_DTYPE_F8;
    st.kv.pool_bytes = 6 * 4096;
    st.kv.prefix_queries = 5;
    st.kv.prefix_query_tokens = 160;
    st.kv.prefix_hits = 3;
    st.kv.prefix_hit_tokens = 48;
    st.kv.evictions = 7;
    st.kv.cow_copies = 1;
    return st;
}

static char *kv_text(const uint8_t *states, int n, const kvd_kv_seq_view *seqs, int num_seqs)
{
    kvd_kv_snapshot snap = {.block_size = 16,
                            .num_blocks = n,
                            .states = (uint8_t *)states,
                            .num_seqs = num_seqs,
                            .seqs = (kvd_kv_seq_view *)seqs,
                            .stats = sample_stats()};
    cJSON *doc = kvd_web_kv_json(&snap);
    assert_non_null(doc);
    char *text = cJSON_PrintUnformatted(doc);
    cJSON_Delete(doc);
    assert_non_null(text);
    return text;
}

#define STATS_TAIL                                                                                      \
    "\"tokens_stored\":41,\"bytes_wasted\":28672,\"block_bytes\":4096,\"dtype\":\"fp8\",\"pool_bytes\":24576,"            \
    "\"prefix_queries\":5,\"prefix_query_tokens\":160,\"prefix_hits\":3,\"prefix_hit_tokens\":48,"     \
    "\"evictions\":7,\"cow_copies\":1,\"num_running\":2,\"num_waiting\":1,\"num_preemptions\":4}}"

static void test_kv_document_exact(void **state)
{
    (void)state;
    /* Two choices sharing block 2 (state 3), each with a block of its own (2). The
     * high bits of a state byte are not part of the state. */
    const uint8_t states[6] = {0, 1, 3, 2, 2, 0x40};
    const int32_t ids[4] = {2, 3, 2, 4};
    const kvd_kv_seq_view seqs[2] = {{7, 0, 20, 19, 2, ids}, {7, 1, 21, 20, 2, ids + 2}};
    char *text = kv_text(states, 6, seqs, 2);
    assert_string_equal(text,
                        "{\"block_size\":16,\"num_blocks\":6,\"states\":\"013220\",\"sequences\":["
                        "{\"request_id\":7,\"choice\":0,\"num_tokens\":20,\"num_computed\":19,\"blocks\":[2,3]},"
                        "{\"request_id\":7,\"choice\":1,\"num_tokens\":21,\"num_computed\":20,\"blocks\":[2,4]}],"
                        "\"stats\":{\"blocks_total\":6,\"blocks_free\":2,\"blocks_cached\":1,\"blocks_used\":3,"
                        "\"blocks_shared\":1,\"usage\":0.5," STATS_TAIL);
    free(text);
}

static void test_kv_document_sequences(void **state)
{
    (void)state;
    const uint8_t states[2] = {2, 0};
    const char *tail = "],\"stats\":{\"blocks_total\":2,\"blocks_free\":1,\"blocks_cached\":0,\"blocks_used\":1,"
                       "\"blocks_shared\":0,\"usage\":0.5," STATS_TAIL;
    char want[2048];
    /* No running sequence: an empty array. */
    char *text = kv_text(states, 2, NULL, 0);
    snprintf(want, sizeof want, "{\"block_size\":16,\"num_blocks\":2,\"states\":\"20\",\"sequences\":[%s", tail);
    assert_string_equal(text, want);
    free(text);
    /* A sequence without blocks yet (admitted, nothing computed) and a large id. */
    const int32_t ids[1] = {0};
    const kvd_kv_seq_view seqs[2] = {{1, 0, 3, 3, 1, ids}, {4000000000ULL, 2, 0, 0, 0, ids}};
    text = kv_text(states, 2, seqs, 2);
    snprintf(want, sizeof want,
             "{\"block_size\":16,\"num_blocks\":2,\"states\":\"20\",\"sequences\":["
             "{\"request_id\":1,\"choice\":0,\"num_tokens\":3,\"num_computed\":3,\"blocks\":[0]},"
             "{\"request_id\":4000000000,\"choice\":2,\"num_tokens\":0,\"num_computed\":0,\"blocks\":[]}%s",
             tail);
    assert_string_equal(text, want);
    free(text);
}

static void test_kv_document_empty_pool(void **state)
{
    (void)state;
    /* Before the engine exists the snapshot is empty; a negative count is treated
     * the same way rather than read out of bounds. */
    const char *want = "{\"block_size\":16,\"num_blocks\":0,\"states\":\"\",\"sequences\":[],"
                       "\"stats\":{\"blocks_total\":0,\"blocks_free\":0,\"blocks_cached\":0,\"blocks_used\":0,"
                       "\"blocks_shared\":0,\"usage\":0," STATS_TAIL;
    char *text = kv_text(NULL, 0, NULL, 0);
    assert_string_equal(text, want);
    free(text);
    const uint8_t one[1] = {2};
    text = kv_text(one, -3, NULL, 0);
    assert_string_equal(text, want);
    free(text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pages_embedded_verbatim),
        cmocka_unit_test(test_find_exact_paths_only),
        cmocka_unit_test(test_kv_document_exact),
        cmocka_unit_test(test_kv_document_sequences),
        cmocka_unit_test(test_kv_document_empty_pool),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
