/* web.c - looks up the embedded pages and builds the KV view's JSON document.
 *
 * The asset table is a handful of rows, so a linear scan is the whole lookup. The
 * KV document is built with cJSON like every other response; each add is checked so
 * that an allocation failure anywhere yields NULL (the route answers 500) rather
 * than a document silently missing a field the page relies on.
 */
#include "web.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

const kvd_web_asset *kvd_web_find(const char *path)
{
    if (!path)
        return NULL;
    for (size_t i = 0; i < kvd_web_num_assets; i++)
        if (strcmp(kvd_web_assets[i].path, path) == 0)
            return &kvd_web_assets[i];
    return NULL;
}

/* cJSON numbers are doubles: counters stay exact up to 2^53, far beyond any pool. */
static bool add_number(cJSON *obj, const char *name, double value)
{
    return cJSON_AddNumberToObject(obj, name, value) != NULL;
}

static cJSON *sequences_of(const kvd_kv_snapshot *snap)
{
    cJSON *seqs = cJSON_CreateArray();
    for (int i = 0; seqs && i < snap->num_seqs; i++) {
        const kvd_kv_seq_view *v = &snap->seqs[i];
        cJSON *seq = cJSON_CreateObject();
        bool ok = seq && cJSON_AddItemToArray(seqs, seq);
        if (!ok)
            cJSON_Delete(seq);
        ok = ok && add_number(seq, "request_id", (double)v->request_id) && add_number(seq, "choice", v->choice) &&
             add_number(seq, "num_tokens", v->num_tokens) && add_number(seq, "num_computed", v->num_computed);
        cJSON *blocks = ok ? cJSON_CreateIntArray(v->blocks, v->num_blocks) : NULL;
        if (ok && !(blocks && cJSON_AddItemToObject(seq, "blocks", blocks))) {
            cJSON_Delete(blocks);
            ok = false;
        }
        if (!ok) {
            cJSON_Delete(seqs);
            return NULL;
        }
    }
    return seqs;
}

static bool add_stats(cJSON *root, const int64_t count[4], int num_blocks, const kvd_engine_stats *st)
{
    cJSON *stats = cJSON_AddObjectToObject(root, "stats");
    if (!stats)
        return false;
    int64_t used = count[2] + count[3];
    const kvd_kv_stats *kv = &st->kv;
    return add_number(stats, "blocks_total", num_blocks) && add_number(stats, "blocks_free", (double)count[0]) &&
           add_number(stats, "blocks_cached", (double)count[1]) && add_number(stats, "blocks_used", (double)used) &&
           add_number(stats, "blocks_shared", (double)count[3]) &&
           add_number(stats, "usage", num_blocks > 0 ? (double)used / num_blocks : 0.0) &&
           add_number(stats, "tokens_stored", (double)kv->tokens_stored) &&
           add_number(stats, "bytes_wasted", (double)kv->bytes_wasted) &&
           add_number(stats, "block_bytes", (double)kv->block_bytes) &&
           cJSON_AddStringToObject(stats, "dtype", kvd_dtype_name(kv->dtype)) != NULL &&
           add_number(stats, "pool_bytes", (double)kv->pool_bytes) &&
           add_number(stats, "prefix_queries", (double)kv->prefix_queries) &&
           add_number(stats, "prefix_query_tokens", (double)kv->prefix_query_tokens) &&
           add_number(stats, "prefix_hits", (double)kv->prefix_hits) &&
           add_number(stats, "prefix_hit_tokens", (double)kv->prefix_hit_tokens) &&
           add_number(stats, "evictions", (double)kv->evictions) &&
           add_number(stats, "cow_copies", (double)kv->cow_copies) &&
           add_number(stats, "num_running", st->num_running) && add_number(stats, "num_waiting", st->num_waiting) &&
           add_number(stats, "num_preemptions", (double)st->num_preemptions);
}

cJSON *kvd_web_kv_json(const kvd_kv_snapshot *snap)
{
    const uint8_t *states = snap->states;
    int num_blocks = snap->num_blocks;
    int block_size = snap->block_size;
    const kvd_engine_stats *st = &snap->stats;
    if (num_blocks < 0 || (num_blocks > 0 && !states))
        num_blocks = 0;
    cJSON *root = cJSON_CreateObject();
    char *digits = malloc((size_t)num_blocks + 1);
    int64_t count[4] = {0, 0, 0, 0}; /* free, cached, used, shared */
    bool ok = root && digits;
    if (ok) {
        for (int i = 0; i < num_blocks; i++) {
            int s = states[i] & 3;
            count[s]++;
            digits[i] = (char)('0' + s);
        }
        digits[num_blocks] = '\0';
        ok = add_number(root, "block_size", block_size) && add_number(root, "num_blocks", num_blocks) &&
             cJSON_AddStringToObject(root, "states", digits) != NULL;
    }
    free(digits);
    if (ok) {
        cJSON *seqs = sequences_of(snap);
        ok = seqs && cJSON_AddItemToObject(root, "sequences", seqs);
        if (!ok)
            cJSON_Delete(seqs);
    }
    if (ok)
        ok = add_stats(root, count, num_blocks, st);
    if (ok && st->disk_configured) {
        /* The disk tier's pages: not blocks of the pool, so outside "states". */
        cJSON *disk = cJSON_AddObjectToObject(root, "disk");
        const kvd_kvdisk_stats *d = &st->disk;
        ok = disk && cJSON_AddBoolToObject(disk, "enabled", d->enabled) && add_number(disk, "pages", (double)d->pages) &&
             add_number(disk, "bytes", (double)d->bytes) &&
             add_number(disk, "capacity_bytes", (double)d->capacity_bytes) &&
             add_number(disk, "num_loading", st->num_loading) &&
             add_number(disk, "queries", (double)st->disk_queries) && add_number(disk, "hits", (double)st->disk_hits) &&
             add_number(disk, "hit_tokens", (double)st->disk_hit_tokens) &&
             add_number(disk, "pages_read", (double)d->pages_read) &&
             add_number(disk, "pages_written", (double)d->pages_written) &&
             add_number(disk, "pages_corrupt", (double)d->pages_corrupt);
    }
    if (!ok) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}
