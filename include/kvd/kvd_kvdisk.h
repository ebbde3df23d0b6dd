/* kvd_kvdisk.h - the KV disk tier: full KV pages kept in files under the prefix cache.
 *
 * When the prefix cache evicts a full, registered page from RAM, its bytes go to a
 * file in a directory instead of being forgotten; a later prefix lookup that misses in
 * RAM finds the pages there and loads them back into pool blocks. A page is named by
 * its chain hash (kvd_kv.h: the hash of its tokens seeded by its parent's hash) and
 * carries everything needed to confirm it is the page asked for: its parent's hash, a
 * second, independent chain hash (XXH64 instead of XXH3) and its own token ids. A hit
 * must match all of them and the store's fingerprint (model weights, tokenizer, KV
 * layout), and pass an XXH3 checksum over header and payload, or it is not served.
 *
 * File format (little endian, one file per page, DIR/<16 hex digits of the hash>.kvp):
 *   kvdisk_header (72 bytes: magic "KVDPAGE\0", version, header_bytes, fingerprint,
 *   hash, parent_hash, check, dtype, block_size, payload_bytes, 8 zero bytes), then block_size int32
 *   token ids, then payload_bytes of the page as the pool holds it, then an 8-byte
 *   XXH3-64 of everything before it. A file is written under a temporary name and
 *   renamed, so a crash never leaves a half file under a page's name; no fsync (the
 *   checksum catches what a power loss could tear, and a lost page is recomputed).
 *   DIR/lock is held with flock while a store is open: a second store on the same
 *   DIR fails with KVD_EBUSY.
 *
 * Capacity: files are evicted least recently used first (recency survives restarts
 * through the files' mtime) so the pages stay within capacity_bytes.
 *
 * Degradation: any I/O error on DIR (unwritable, full, removed) disables the store
 * with one warning through cfg.warn; from then on it answers every lookup with a
 * miss and drops writes. Nothing it does fails a request.
 *
 * Threads: the store owns one I/O thread that performs every read and write. Lookups
 * of the index (kvd_kvdisk_contains), queueing writes and loads, polling finished
 * loads and stats are safe from any thread (a mutex guards the index and the queues
 * and is never held across file I/O except an unlink). Ownership: the caller owns
 * load destinations until the load is polled back; the store copies everything else.
 */
#ifndef KVD_KVDISK_H
#define KVD_KVDISK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_kv.h"
#include "kvd/kvd_model.h"
#include "kvd/kvd_tokenizer.h"

#define KVD_KVDISK_VERSION 1
/* Upper bounds of the load latency histogram, seconds. */
#define KVD_KVDISK_LATENCY_BOUNDS {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5}
#define KVD_KVDISK_LATENCY_BUCKETS 12

typedef struct kvd_kvdisk_config {
    const char *dir;          /* created if missing (one level) */
    uint64_t capacity_bytes;  /* files' total size stays under this */
    uint64_t fingerprint;     /* kvd_kvdisk_fingerprint: pages of anything else are ignored */
    int dtype;                /* the pool's kvd_dtype */
    int block_size;           /* tokens per page */
    size_t page_bytes;        /* payload bytes per page (the pool's block_bytes) */
    int max_pending_writes;   /* writes queued at once; more are dropped (0: 64) */
    /* A one-line warning (store disabled, files ignored); from any thread; may be NULL. */
    void (*warn)(void *arg, const char *msg);
    void *warn_arg;
    /* A load finished (called on the I/O thread, without the store's lock); may be NULL. */
    void (*notify)(void *arg);       /* (the caller's way to wait for a load) */
    void *notify_arg;
} kvd_kvdisk_config;

/* What names (hash: the file's name) and confirms (parent_hash, check) one page. */
typedef kvd_kv_page_key kvd_kvdisk_key;

typedef struct kvd_kvdisk_stats {
    bool enabled;             /* false once an I/O error disabled the store */
    int64_t pages;            /* files in the index */
    int64_t bytes;            /* their total size */
    uint64_t capacity_bytes;
    uint64_t pages_written, bytes_written;
    uint64_t pages_read, bytes_read;       /* pages loaded and confirmed */
    uint64_t writes_dropped;  /* queue full, store disabled, or larger than the capacity */
    uint64_t pages_evicted;   /* files removed to stay under the capacity */
    uint64_t pages_corrupt;   /* files dropped: short, bad header or checksum */
    uint64_t pages_mismatch;  /* a file under the hash held another page (collision): not served */
    uint64_t files_ignored;   /* files of another fingerprint or layout found at open */
    uint64_t loads;           /* load jobs finished */
    uint64_t load_latency_counts[KVD_KVDISK_LATENCY_BUCKETS + 1]; /* per bucket; last is +Inf */
    double load_latency_sum;  /* seconds */
} kvd_kvdisk_stats;

typedef struct kvd_kvdisk kvd_kvdisk;

/* A read of consecutive pages of one prefix into caller-owned buffers. */
typedef struct kvd_kvdisk_load {
    struct kvd_kvdisk_load *next;
    void *user;               /* the caller's, returned as given */
    int num_pages;
    int pages_loaded;         /* set when done: the leading pages confirmed and copied */
    double seconds;           /* set when done: queue to completion */
    /* Private to the store: */
    kvd_kvdisk_key *keys;     /* [num_pages] */
    int32_t *tokens;          /* [num_pages * block_size] */
    void **dst;               /* [num_pages] page_bytes each */
    uint64_t queued_ns;
} kvd_kvdisk_load;

/* XXH3 over the model's weights (every matrix and vector), the tokenizer's ids
 * (decoded bytes and special flags), and the KV layout (dtype, block size, shape). */
uint64_t kvd_kvdisk_fingerprint(const kvd_model *model, const kvd_tokenizer *tok, int kv_dtype, int block_size);

/* Opens (creating) cfg->dir, takes its lock and builds the index from the files there.
 * NULL with err set: KVD_EBUSY when another store holds DIR, KVD_EIO when DIR cannot
 * be created, opened or locked, KVD_EINVAL on a bad config, KVD_ENOMEM. */
kvd_kvdisk *kvd_kvdisk_open(const kvd_kvdisk_config *cfg, kvd_error *err);
/* Finishes every queued write, stops the I/O thread, releases the lock. Loads still
 * queued complete with pages_loaded = 0 and are freed. NULL does nothing. */
void kvd_kvdisk_close(kvd_kvdisk *d);

/* True when the index holds a page under key->hash or its write is still queued (a
 * load then copies the queued page, confirmed the same way; a file is confirmed only
 * when loaded). False when disabled. */
bool kvd_kvdisk_contains(kvd_kvdisk *d, uint64_t hash);

/* Queues a write of one page: tokens (block_size ids) and page_bytes of data are
 * copied now, on the caller's thread. A page already on disk is only marked used. With
 * wait, blocks while the queue is full (shutdown flush); else a full queue drops the
 * write. Returns 0 when queued (or already there), KVD_EBUSY when dropped, KVD_ESTATE
 * when disabled, KVD_ENOMEM. */
int kvd_kvdisk_write(kvd_kvdisk *d, const kvd_kvdisk_key *key, const int32_t *tokens, const void *data, bool wait);

/* Queues a load of num_pages consecutive pages (keys and tokens copied); dst[i]
 * receives page i's payload. The caller must not touch dst until the load is polled.
 * Returns the job or NULL (KVD_ENOMEM, or KVD_ESTATE when disabled) with err set. */
kvd_kvdisk_load *kvd_kvdisk_load_submit(kvd_kvdisk *d, const kvd_kvdisk_key *keys, const int32_t *tokens,
                                        void *const *dst, int num_pages, void *user, kvd_error *err);
/* Takes every finished load (oldest first), or NULL. */
kvd_kvdisk_load *kvd_kvdisk_load_poll(kvd_kvdisk *d);
void kvd_kvdisk_load_free(kvd_kvdisk_load *load);

/* Blocks until the write queue is empty (tests, shutdown). */
void kvd_kvdisk_flush(kvd_kvdisk *d);

void kvd_kvdisk_stats_get(kvd_kvdisk *d, kvd_kvdisk_stats *out);

#endif
