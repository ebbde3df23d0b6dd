/* store.c - the KV disk tier's files, index and I/O thread (kvd_kvdisk.h).
 *
 * The index maps a page's hash to an entry (file size, LRU links) in an
 * open-addressing table with linear probing and backward-shift deletion; entries live
 * in one array with a free list, the LRU list runs from least to most recently used.
 * Only the I/O thread touches files; it serves loads before writes, since a request
 * waits for a load while a write only has to happen before its pages are asked for.
 * Every file operation goes through the directory's descriptor (openat, renameat,
 * unlinkat), so a DIR removed or replaced while the store is open is noticed as
 * errors on that descriptor rather than writes going somewhere else.
 */
#include "kvd/kvd_kvdisk.h"
#include "kvd/kvd_clock.h"
#include "kvd/kvd_thread.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

static const char page_magic[8] = {'K', 'V', 'D', 'P', 'A', 'G', 'E', '\0'};
static const double latency_bounds[KVD_KVDISK_LATENCY_BUCKETS] = KVD_KVDISK_LATENCY_BOUNDS;

/* On disk, little endian (the only byte order kvd runs on). */
typedef struct kvdisk_header {
    char magic[8];
    uint32_t version;
    uint32_t header_bytes;   /* this struct plus the token ids */
    uint64_t fingerprint;
    uint64_t hash;
    uint64_t parent_hash;
    uint64_t check;
    uint32_t dtype;
    uint32_t block_size;
    uint64_t payload_bytes;
    uint64_t reserved;
} kvdisk_header;
_Static_assert(sizeof(kvdisk_header) == 72, "the on-disk header is 72 bytes");

typedef struct disk_entry {
    uint64_t hash;
    uint64_t bytes;
    int32_t prev, next;      /* LRU links; next doubles as the free-list link */
} disk_entry;

typedef struct write_job {
    struct write_job *next;
    kvd_kvdisk_key key;
    int32_t *tokens;         /* points into the same allocation */
    uint8_t *data;
} write_job;

struct kvd_kvdisk {
    kvd_kvdisk_config cfg;
    char *dir;
    int dir_fd;
    int lock_fd;
    size_t header_bytes;     /* header + tokens */
    uint64_t file_bytes;     /* header + tokens + payload + checksum */

    pthread_mutex_t lock;
    pthread_cond_t work;     /* the I/O thread waits for jobs */
    pthread_cond_t progress; /* writers wait for room, flush for an empty queue, loads for completion */
    pthread_t thread;
    bool thread_started;
    bool stopping;
    bool enabled;
    write_job *writes_head, *writes_tail;
    int num_writes;
    bool writing;            /* the I/O thread holds a write job */
    kvd_kvdisk_load *loads_head, *loads_tail;
    kvd_kvdisk_load *done_head, *done_tail;

    disk_entry *entries;
    int32_t num_entries, entries_cap, free_entry;
    int32_t lru_head, lru_tail;
    struct { uint64_t key; int32_t entry; } *map;
    size_t map_mask;
    int32_t map_len;
    kvd_kvdisk_stats stats;

    uint8_t *scratch;        /* I/O thread: header + tokens + checksum of one file */
};

static void warn(const kvd_kvdisk *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void warn(const kvd_kvdisk *d, const char *fmt, ...)
{
    if (!d->cfg.warn)
        return;
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    d->cfg.warn(d->cfg.warn_arg, msg);
}

static void page_name(char *out, size_t cap, uint64_t hash)
{
    snprintf(out, cap, "%016llx.kvp", (unsigned long long)hash);
}

/* ---- index (under lock) ------------------------------------------------------------- */

static size_t slot_of(const kvd_kvdisk *d, uint64_t key)
{
    return (size_t)(key ^ (key >> 29)) & d->map_mask;
}

static int32_t index_find(const kvd_kvdisk *d, uint64_t hash)
{
    for (size_t i = slot_of(d, hash);; i = (i + 1) & d->map_mask) {
        if (d->map[i].entry < 0)
            return -1;
        if (d->map[i].key == hash)
            return d->map[i].entry;
    }
}

/* A queued write of hash, or NULL. Jobs stay queued until their file is in the index
 * (only the I/O thread unlinks them, after do_write), so a page is always found in
 * one of the two; the queue is short (max_pending_writes), so a scan is enough. */
static const write_job *pending_find(const kvd_kvdisk *d, uint64_t hash)
{
    for (const write_job *job = d->writes_head; job; job = job->next)
        if (job->key.hash == hash)
            return job;
    return NULL;
}

static int index_grow_map(kvd_kvdisk *d)
{
    size_t slots = (d->map_mask + 1) * 2;
    __typeof__(d->map) map = malloc(slots * sizeof *map);
    if (!map)
        return KVD_ENOMEM;
    for (size_t i = 0; i < slots; i++)
        map[i].entry = -1;
    __typeof__(d->map) old = d->map;
    size_t old_slots = d->map_mask + 1;
    d->map = map;
    d->map_mask = slots - 1;
    for (size_t i = 0; i < old_slots; i++) {
        if (old[i].entry < 0)
            continue;
        size_t j = slot_of(d, old[i].key);
        while (map[j].entry >= 0)
            j = (j + 1) & d->map_mask;
        map[j] = old[i];
    }
    free(old);
    return 0;
}

static void lru_unlink(kvd_kvdisk *d, int32_t e)
{
    disk_entry *en = &d->entries[e];
    if (en->prev >= 0)
        d->entries[en->prev].next = en->next;
    else
        d->lru_head = en->next;
    if (en->next >= 0)
        d->entries[en->next].prev = en->prev;
    else
        d->lru_tail = en->prev;
    en->prev = en->next = -1;
}

static void lru_push_tail(kvd_kvdisk *d, int32_t e)
{
    disk_entry *en = &d->entries[e];
    en->prev = d->lru_tail;
    en->next = -1;
    if (d->lru_tail >= 0)
        d->entries[d->lru_tail].next = e;
    else
        d->lru_head = e;
    d->lru_tail = e;
}

/* Appends at the most recently used end. A hash already present is left alone. */
static int index_insert(kvd_kvdisk *d, uint64_t hash, uint64_t bytes)
{
    if (index_find(d, hash) >= 0)
        return 0;
    if ((size_t)(d->map_len + 1) * 2 > d->map_mask + 1 && index_grow_map(d) < 0)
        return KVD_ENOMEM;
    int32_t e = d->free_entry;
    if (e >= 0) {
        d->free_entry = d->entries[e].next;
    } else {
        if (d->num_entries == d->entries_cap) {
            int32_t cap = d->entries_cap ? d->entries_cap * 2 : 256;
            disk_entry *grown = realloc(d->entries, (size_t)cap * sizeof *grown);
            if (!grown)
                return KVD_ENOMEM;
            d->entries = grown;
            d->entries_cap = cap;
        }
        e = d->num_entries++;
    }
    d->entries[e] = (disk_entry){.hash = hash, .bytes = bytes, .prev = -1, .next = -1};
    lru_push_tail(d, e);
    size_t i = slot_of(d, hash);
    while (d->map[i].entry >= 0)
        i = (i + 1) & d->map_mask;
    d->map[i].key = hash;
    d->map[i].entry = e;
    d->map_len++;
    d->stats.pages++;
    d->stats.bytes += (int64_t)bytes;
    return 0;
}

static void index_remove(kvd_kvdisk *d, uint64_t hash)
{
    size_t i = slot_of(d, hash);
    while (d->map[i].entry >= 0 && d->map[i].key != hash)
        i = (i + 1) & d->map_mask;
    int32_t e = d->map[i].entry;
    if (e < 0)
        return;
    /* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
    size_t hole = i;
    for (size_t j = (i + 1) & d->map_mask; d->map[j].entry >= 0; j = (j + 1) & d->map_mask) {
        size_t home = slot_of(d, d->map[j].key);
        if (((j - home) & d->map_mask) >= ((j - hole) & d->map_mask)) {
            d->map[hole] = d->map[j];
            hole = j;
        }
    }
    d->map[hole].entry = -1;
    d->map_len--;
    d->stats.pages--;
    d->stats.bytes -= (int64_t)d->entries[e].bytes;
    lru_unlink(d, e);
    d->entries[e].next = d->free_entry;
    d->free_entry = e;
}

static void drop_file(kvd_kvdisk *d, uint64_t hash)
{
    char name[32];
    page_name(name, sizeof name, hash);
    (void)unlinkat(d->dir_fd, name, 0);
    index_remove(d, hash);
}

/* Under lock. The first error turns the tier off for good: a full or vanished DIR
 * would only fail again, and each failure costs a system call on every eviction. */
static void disable(kvd_kvdisk *d, const char *what, int errnum)
{
    if (!d->enabled)
        return;
    d->enabled = false;
    d->stats.enabled = false;
    warn(d, "kv disk: %s in %s: %s; the disk tier is off until restart (requests go on without it)", what, d->dir,
         strerror(errnum));
}

/* ---- files (I/O thread, or open) -------------------------------------------------- */

static void fill_header(const kvd_kvdisk *d, kvdisk_header *h, const kvd_kvdisk_key *key)
{
    memset(h, 0, sizeof *h);
    memcpy(h->magic, page_magic, sizeof page_magic);
    h->version = KVD_KVDISK_VERSION;
    h->header_bytes = (uint32_t)d->header_bytes;
    h->fingerprint = d->cfg.fingerprint;
    h->hash = key->hash;
    h->parent_hash = key->parent_hash;
    h->check = key->check;
    h->dtype = (uint32_t)d->cfg.dtype;
    h->block_size = (uint32_t)d->cfg.block_size;
    h->payload_bytes = d->cfg.page_bytes;
}

/* Ours: same magic, version, fingerprint and layout. */
static bool header_is_ours(const kvd_kvdisk *d, const kvdisk_header *h)
{
    return memcmp(h->magic, page_magic, sizeof page_magic) == 0 && h->version == KVD_KVDISK_VERSION &&
           h->header_bytes == d->header_bytes && h->fingerprint == d->cfg.fingerprint &&
           h->dtype == (uint32_t)d->cfg.dtype && h->block_size == (uint32_t)d->cfg.block_size &&
           h->payload_bytes == d->cfg.page_bytes;
}

static ssize_t write_all(int fd, struct iovec *iov, int n)
{
    size_t total = 0;
    while (n > 0) {
        ssize_t w = writev(fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        total += (size_t)w;
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return (ssize_t)total;
}

static void do_write(kvd_kvdisk *d, write_job *job)
{
    pthread_mutex_lock(&d->lock);
    bool skip = !d->enabled || index_find(d, job->key.hash) >= 0;
    if (!skip && d->file_bytes > d->cfg.capacity_bytes) {
        d->stats.writes_dropped++;
        skip = true;
    }
    pthread_mutex_unlock(&d->lock);
    if (skip)
        return;

    kvdisk_header h;
    fill_header(d, &h, &job->key);
    size_t token_bytes = (size_t)d->cfg.block_size * sizeof(int32_t);
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, &h, sizeof h);
    XXH3_64bits_update(&st, job->tokens, token_bytes);
    XXH3_64bits_update(&st, job->data, d->cfg.page_bytes);
    uint64_t sum = XXH3_64bits_digest(&st);

    char name[32], tmp[64];
    page_name(name, sizeof name, job->key.hash);
    snprintf(tmp, sizeof tmp, ".tmp-%s", name);
    int fd = openat(d->dir_fd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        pthread_mutex_lock(&d->lock);
        disable(d, "cannot create a page file", errno);
        d->stats.writes_dropped++;
        pthread_mutex_unlock(&d->lock);
        return;
    }
    struct iovec iov[4] = {{&h, sizeof h}, {job->tokens, token_bytes}, {job->data, d->cfg.page_bytes},
                           {&sum, sizeof sum}};
    ssize_t w = write_all(fd, iov, 4);
    int write_errno = errno;
    int close_rc = close(fd);
    if (w < 0 || close_rc < 0) {
        (void)unlinkat(d->dir_fd, tmp, 0);
        pthread_mutex_lock(&d->lock);
        disable(d, "cannot write a page file", w < 0 ? write_errno : errno);
        d->stats.writes_dropped++;
        pthread_mutex_unlock(&d->lock);
        return;
    }

    pthread_mutex_lock(&d->lock);
    /* Room first, so the directory never holds more than the capacity for long. */
    while (d->lru_head >= 0 && (uint64_t)d->stats.bytes + d->file_bytes > d->cfg.capacity_bytes) {
        drop_file(d, d->entries[d->lru_head].hash);
        d->stats.pages_evicted++;
    }
    int rc = renameat(d->dir_fd, tmp, d->dir_fd, name);
    if (rc < 0) {
        int e = errno;
        (void)unlinkat(d->dir_fd, tmp, 0);
        disable(d, "cannot rename a page file", e);
        d->stats.writes_dropped++;
    } else if (index_insert(d, job->key.hash, d->file_bytes) < 0) {
        (void)unlinkat(d->dir_fd, name, 0);
        d->stats.writes_dropped++;
    } else {
        d->stats.pages_written++;
        d->stats.bytes_written += d->file_bytes;
    }
    pthread_mutex_unlock(&d->lock);
}

typedef enum read_result { READ_OK, READ_MISSING, READ_CORRUPT, READ_MISMATCH, READ_IOERROR } read_result;

/* Reads page key into dst and confirms it. dst may hold garbage on failure. */
static read_result read_page(kvd_kvdisk *d, const kvd_kvdisk_key *key, const int32_t *tokens, void *dst, int *err_no)
{
    char name[32];
    page_name(name, sizeof name, key->hash);
    int fd = openat(d->dir_fd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        *err_no = errno;
        return errno == ENOENT ? READ_MISSING : READ_IOERROR;
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0 || (uint64_t)sb.st_size != d->file_bytes) {
        close(fd);
        return READ_CORRUPT;
    }
    uint8_t *head = d->scratch;
    uint64_t sum = 0;
    struct iovec iov[3] = {{head, d->header_bytes}, {dst, d->cfg.page_bytes}, {&sum, sizeof sum}};
    size_t want = d->file_bytes, got = 0;
    int n = 3;
    struct iovec *v = iov;
    while (got < want) {
        ssize_t r = readv(fd, v, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            *err_no = r < 0 ? errno : EIO;
            close(fd);
            return r < 0 ? READ_IOERROR : READ_CORRUPT;
        }
        got += (size_t)r;
        while (n > 0 && (size_t)r >= v->iov_len) {
            r -= (ssize_t)v->iov_len;
            v++;
            n--;
        }
        if (n > 0) {
            v->iov_base = (uint8_t *)v->iov_base + r;
            v->iov_len -= (size_t)r;
        }
    }
    /* Recency survives a restart: the index is rebuilt in mtime order. */
    (void)futimens(fd, NULL);
    close(fd);
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, head, d->header_bytes);
    XXH3_64bits_update(&st, dst, d->cfg.page_bytes);
    kvdisk_header h;
    memcpy(&h, head, sizeof h);
    if (XXH3_64bits_digest(&st) != sum || !header_is_ours(d, &h) || h.hash != key->hash)
        return READ_CORRUPT;
    if (h.parent_hash != key->parent_hash || h.check != key->check ||
        memcmp(head + sizeof h, tokens, (size_t)d->cfg.block_size * sizeof(int32_t)) != 0)
        return READ_MISMATCH;
    return READ_OK;
}

static void do_load(kvd_kvdisk *d, kvd_kvdisk_load *load)
{
    int loaded = 0;
    for (; loaded < load->num_pages; loaded++) {
        const kvd_kvdisk_key *key = &load->keys[loaded];
        const int32_t *tokens = load->tokens + (size_t)loaded * (size_t)d->cfg.block_size;
        pthread_mutex_lock(&d->lock);
        bool present = d->enabled && index_find(d, key->hash) >= 0;
        const write_job *queued = d->enabled && !present ? pending_find(d, key->hash) : NULL;
        pthread_mutex_unlock(&d->lock);
        if (queued) {
            /* Evicted so recently its file is not written yet: the queued copy is the
             * page (this thread is the only one that frees jobs), confirmed the same way. */
            if (queued->key.parent_hash != key->parent_hash || queued->key.check != key->check ||
                memcmp(queued->tokens, tokens, (size_t)d->cfg.block_size * sizeof(int32_t)) != 0) {
                pthread_mutex_lock(&d->lock);
                d->stats.pages_mismatch++;
                pthread_mutex_unlock(&d->lock);
                break;
            }
            memcpy(load->dst[loaded], queued->data, d->cfg.page_bytes);
            pthread_mutex_lock(&d->lock);
            d->stats.pages_read++;
            pthread_mutex_unlock(&d->lock);
            continue;
        }
        if (!present)
            break;
        int err_no = 0;
        read_result r = read_page(d, key, tokens, load->dst[loaded], &err_no);
        pthread_mutex_lock(&d->lock);
        if (r == READ_OK) {
            int32_t e = index_find(d, key->hash);
            if (e >= 0) {
                lru_unlink(d, e);
                lru_push_tail(d, e);
            }
            d->stats.pages_read++;
            d->stats.bytes_read += d->file_bytes;
        } else if (r == READ_CORRUPT) {
            drop_file(d, key->hash);
            d->stats.pages_corrupt++;
            warn(d, "kv disk: dropped corrupt page file %016llx.kvp (short, bad header or checksum)",
                 (unsigned long long)key->hash);
        } else if (r == READ_MISMATCH) {
            d->stats.pages_mismatch++;
        } else if (r == READ_MISSING) {
            struct stat sb;
            /* Gone with its directory, or removed by hand. */
            if (fstat(d->dir_fd, &sb) < 0 || sb.st_nlink == 0)
                disable(d, "the directory was removed", ENOENT);
            index_remove(d, key->hash);
        } else {
            disable(d, "cannot read a page file", err_no);
        }
        pthread_mutex_unlock(&d->lock);
        if (r != READ_OK)
            break;
    }
    load->pages_loaded = loaded;
}

static void *io_main(void *arg)
{
    kvd_kvdisk *d = arg;
    pthread_mutex_lock(&d->lock);
    for (;;) {
        while (!d->stopping && !d->loads_head && !d->writes_head)
            pthread_cond_wait(&d->work, &d->lock);
        if (d->loads_head) {
            kvd_kvdisk_load *load = d->loads_head;
            d->loads_head = load->next;
            if (!d->loads_head)
                d->loads_tail = NULL;
            load->next = NULL;
            pthread_mutex_unlock(&d->lock);
            do_load(d, load);
            uint64_t t = kvd_now_ns();
            pthread_mutex_lock(&d->lock);
            load->seconds = (double)(t - load->queued_ns) * 1e-9;
            int b = 0;
            while (b < KVD_KVDISK_LATENCY_BUCKETS && load->seconds > latency_bounds[b])
                b++;
            d->stats.load_latency_counts[b]++;
            d->stats.load_latency_sum += load->seconds;
            d->stats.loads++;
            if (d->done_tail)
                d->done_tail->next = load;
            else
                d->done_head = load;
            d->done_tail = load;
            pthread_cond_broadcast(&d->progress);
            pthread_mutex_unlock(&d->lock);
            if (d->cfg.notify)
                d->cfg.notify(d->cfg.notify_arg);
            pthread_mutex_lock(&d->lock);
            continue;
        }
        if (d->writes_head) {
            /* Unlinked only once written, so lookups find the page all along; only
             * this thread unlinks, and others append at the tail. */
            write_job *job = d->writes_head;
            d->writing = true;
            pthread_mutex_unlock(&d->lock);
            do_write(d, job);
            pthread_mutex_lock(&d->lock);
            d->writes_head = job->next;
            if (!d->writes_head)
                d->writes_tail = NULL;
            free(job);
            d->num_writes--;
            d->writing = false;
            pthread_cond_broadcast(&d->progress);
            continue;
        }
        if (d->stopping)
            break;
    }
    pthread_mutex_unlock(&d->lock);
    return NULL;
}

/* ---- open: lock and scan -------------------------------------------------------- */

typedef struct scanned {
    uint64_t hash;
    struct timespec mtime;
} scanned;

static int by_mtime(const void *a, const void *b)
{
    const scanned *x = a, *y = b;
    if (x->mtime.tv_sec != y->mtime.tv_sec)
        return x->mtime.tv_sec < y->mtime.tv_sec ? -1 : 1;
    if (x->mtime.tv_nsec != y->mtime.tv_nsec)
        return x->mtime.tv_nsec < y->mtime.tv_nsec ? -1 : 1;
    return x->hash < y->hash ? -1 : x->hash > y->hash;
}

static bool parse_page_name(const char *name, uint64_t *hash)
{
    if (strlen(name) != 20 || strcmp(name + 16, ".kvp") != 0)
        return false;
    uint64_t v = 0;
    for (int i = 0; i < 16; i++) {
        char c = name[i];
        int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (digit < 0)
            return false;
        v = v << 4 | (uint64_t)digit;
    }
    *hash = v;
    return true;
}

/* Indexes DIR's page files, oldest first. Temporary files are leftovers of a crash
 * (the lock says no one else writes here): removed. Files of another fingerprint or
 * layout are left alone and counted; our files with a wrong size or header are
 * removed. Checksums are verified at load, not here: a scan reads headers only. */
static int scan(kvd_kvdisk *d, kvd_error *err)
{
    DIR *dir = fdopendir(dup(d->dir_fd));
    if (!dir)
        return kvd_error_set(err, KVD_EIO, "kv disk: cannot list %s: %s", d->dir, strerror(errno));
    scanned *found = NULL;
    size_t num = 0, cap = 0;
    uint64_t corrupt = 0;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        if (strncmp(de->d_name, ".tmp-", 5) == 0) {
            (void)unlinkat(d->dir_fd, de->d_name, 0);
            continue;
        }
        uint64_t hash;
        if (!parse_page_name(de->d_name, &hash))
            continue;
        int fd = openat(d->dir_fd, de->d_name, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        kvdisk_header h;
        struct stat sb;
        bool ok = fstat(fd, &sb) == 0 && pread(fd, &h, sizeof h, 0) == (ssize_t)sizeof h;
        close(fd);
        if (!ok || memcmp(h.magic, page_magic, sizeof page_magic) != 0 || h.version != KVD_KVDISK_VERSION) {
            d->stats.files_ignored++;
            continue;
        }
        if (h.fingerprint != d->cfg.fingerprint || h.dtype != (uint32_t)d->cfg.dtype ||
            h.block_size != (uint32_t)d->cfg.block_size || h.payload_bytes != d->cfg.page_bytes) {
            d->stats.files_ignored++;
            continue;
        }
        if (!header_is_ours(d, &h) || h.hash != hash || (uint64_t)sb.st_size != d->file_bytes) {
            (void)unlinkat(d->dir_fd, de->d_name, 0);
            corrupt++;
            continue;
        }
        if (num == cap) {
            cap = cap ? cap * 2 : 256;
            scanned *grown = realloc(found, cap * sizeof *grown);
            if (!grown) {
                free(found);
                closedir(dir);
                return kvd_error_set(err, KVD_ENOMEM, "kv disk: out of memory indexing %s", d->dir);
            }
            found = grown;
        }
        found[num++] = (scanned){.hash = hash, .mtime = sb.st_mtim};
    }
    closedir(dir);
    if (num > 1)
        qsort(found, num, sizeof *found, by_mtime);
    int rc = 0;
    for (size_t i = 0; i < num && rc == 0; i++)
        rc = index_insert(d, found[i].hash, d->file_bytes);
    free(found);
    if (rc < 0)
        return kvd_error_set(err, KVD_ENOMEM, "kv disk: out of memory indexing %s", d->dir);
    /* A smaller capacity than last time: the oldest go. */
    while (d->lru_head >= 0 && (uint64_t)d->stats.bytes > d->cfg.capacity_bytes) {
        drop_file(d, d->entries[d->lru_head].hash);
        d->stats.pages_evicted++;
    }
    d->stats.pages_corrupt += corrupt;
    if (d->stats.files_ignored > 0)
        warn(d, "kv disk: %s: ignored %llu page file(s) of another model, tokenizer or KV layout", d->dir,
             (unsigned long long)d->stats.files_ignored);
    if (corrupt > 0)
        warn(d, "kv disk: %s: removed %llu damaged page file(s)", d->dir, (unsigned long long)corrupt);
    return 0;
}

kvd_kvdisk *kvd_kvdisk_open(const kvd_kvdisk_config *cfg, kvd_error *err)
{
    if (!cfg || !cfg->dir || !cfg->dir[0] || cfg->block_size < 1 || cfg->page_bytes == 0) {
        kvd_error_set(err, KVD_EINVAL, "kv disk: a directory, block size and page size are required");
        return NULL;
    }
    kvd_kvdisk *d = calloc(1, sizeof *d);
    if (!d) {
        kvd_error_set(err, KVD_ENOMEM, "kv disk: out of memory");
        return NULL;
    }
    d->cfg = *cfg;
    if (d->cfg.max_pending_writes <= 0)
        d->cfg.max_pending_writes = 64;
    d->dir_fd = -1;
    d->lock_fd = -1;
    d->lru_head = d->lru_tail = -1;
    d->free_entry = -1;
    d->enabled = true;
    d->stats.enabled = true;
    d->stats.capacity_bytes = cfg->capacity_bytes;
    d->header_bytes = sizeof(kvdisk_header) + (size_t)cfg->block_size * sizeof(int32_t);
    d->file_bytes = d->header_bytes + cfg->page_bytes + sizeof(uint64_t);
    pthread_mutex_init(&d->lock, NULL);
    pthread_cond_init(&d->work, NULL);
    pthread_cond_init(&d->progress, NULL);
    d->dir = strdup(cfg->dir);
    d->cfg.dir = d->dir;
    d->scratch = malloc(d->header_bytes);
    d->map_mask = 255;
    d->map = malloc((d->map_mask + 1) * sizeof *d->map);
    if (!d->dir || !d->scratch || !d->map) {
        kvd_error_set(err, KVD_ENOMEM, "kv disk: out of memory");
        goto fail;
    }
    for (size_t i = 0; i <= d->map_mask; i++)
        d->map[i].entry = -1;
    if (mkdir(d->dir, 0755) < 0 && errno != EEXIST) {
        kvd_error_set(err, KVD_EIO, "kv disk: cannot create %s: %s", d->dir, strerror(errno));
        goto fail;
    }
    d->dir_fd = open(d->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (d->dir_fd < 0) {
        kvd_error_set(err, KVD_EIO, "kv disk: cannot open %s: %s", d->dir, strerror(errno));
        goto fail;
    }
    d->lock_fd = openat(d->dir_fd, "lock", O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (d->lock_fd < 0) {
        kvd_error_set(err, KVD_EIO, "kv disk: cannot create %s/lock: %s", d->dir, strerror(errno));
        goto fail;
    }
    if (flock(d->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno == EWOULDBLOCK)
            kvd_error_set(err, KVD_EBUSY, "kv disk: %s is in use by another kvd (%s/lock is held)", d->dir, d->dir);
        else
            kvd_error_set(err, KVD_EIO, "kv disk: cannot lock %s/lock: %s", d->dir, strerror(errno));
        goto fail;
    }
    if (scan(d, err) < 0)
        goto fail;
    int rc = kvd_thread_start(&d->thread, io_main, d);
    if (rc != 0) {
        kvd_error_set(err, KVD_ENOMEM, "kv disk: cannot start the I/O thread: %s", strerror(rc));
        goto fail;
    }
    d->thread_started = true;
    return d;
fail:
    kvd_kvdisk_close(d);
    return NULL;
}

void kvd_kvdisk_close(kvd_kvdisk *d)
{
    if (!d)
        return;
    if (d->thread_started) {
        pthread_mutex_lock(&d->lock);
        d->stopping = true;
        pthread_cond_broadcast(&d->work);
        pthread_mutex_unlock(&d->lock);
        pthread_join(d->thread, NULL);
    }
    /* Whatever was never taken: writes were all done by the thread before it stopped. */
    while (d->loads_head) {
        kvd_kvdisk_load *l = d->loads_head;
        d->loads_head = l->next;
        kvd_kvdisk_load_free(l);
    }
    while (d->done_head) {
        kvd_kvdisk_load *l = d->done_head;
        d->done_head = l->next;
        kvd_kvdisk_load_free(l);
    }
    while (d->writes_head) {
        write_job *j = d->writes_head;
        d->writes_head = j->next;
        free(j);
    }
    if (d->lock_fd >= 0)
        close(d->lock_fd); /* releases the flock */
    if (d->dir_fd >= 0)
        close(d->dir_fd);
    pthread_cond_destroy(&d->progress);
    pthread_cond_destroy(&d->work);
    pthread_mutex_destroy(&d->lock);
    free(d->map);
    free(d->entries);
    free(d->scratch);
    free(d->dir);
    free(d);
}

/* ---- any thread --------------------------------------------------------------------- */

bool kvd_kvdisk_contains(kvd_kvdisk *d, uint64_t hash)
{
    pthread_mutex_lock(&d->lock);
    bool found = d->enabled && (index_find(d, hash) >= 0 || pending_find(d, hash));
    pthread_mutex_unlock(&d->lock);
    return found;
}

int kvd_kvdisk_write(kvd_kvdisk *d, const kvd_kvdisk_key *key, const int32_t *tokens, const void *data, bool wait)
{
    pthread_mutex_lock(&d->lock);
    int rc = 0;
    if (!d->enabled) {
        d->stats.writes_dropped++;
        rc = KVD_ESTATE;
    } else if (index_find(d, key->hash) >= 0) {
        int32_t e = index_find(d, key->hash);
        lru_unlink(d, e);
        lru_push_tail(d, e);
        rc = 1;
    } else if (pending_find(d, key->hash)) {
        rc = 1;
    } else {
        while (wait && d->enabled && d->num_writes >= d->cfg.max_pending_writes)
            pthread_cond_wait(&d->progress, &d->lock);
        if (d->num_writes >= d->cfg.max_pending_writes || !d->enabled) {
            d->stats.writes_dropped++;
            rc = KVD_EBUSY;
        } else {
            d->num_writes++; /* the slot is ours while we copy without the lock */
        }
    }
    pthread_mutex_unlock(&d->lock);
    if (rc != 0)
        return rc > 0 ? 0 : rc;

    size_t token_bytes = (size_t)d->cfg.block_size * sizeof(int32_t);
    write_job *job = malloc(sizeof *job + token_bytes + d->cfg.page_bytes);
    pthread_mutex_lock(&d->lock);
    if (!job) {
        d->num_writes--;
        d->stats.writes_dropped++;
        pthread_cond_broadcast(&d->progress);
        pthread_mutex_unlock(&d->lock);
        return KVD_ENOMEM;
    }
    pthread_mutex_unlock(&d->lock);
    job->next = NULL;
    job->key = *key;
    job->tokens = (int32_t *)(job + 1);
    job->data = (uint8_t *)job->tokens + token_bytes;
    memcpy(job->tokens, tokens, token_bytes);
    memcpy(job->data, data, d->cfg.page_bytes);
    pthread_mutex_lock(&d->lock);
    if (d->writes_tail)
        d->writes_tail->next = job;
    else
        d->writes_head = job;
    d->writes_tail = job;
    pthread_cond_signal(&d->work);
    pthread_mutex_unlock(&d->lock);
    return 0;
}

void kvd_kvdisk_load_free(kvd_kvdisk_load *load)
{
    free(load);
}

kvd_kvdisk_load *kvd_kvdisk_load_submit(kvd_kvdisk *d, const kvd_kvdisk_key *keys, const int32_t *tokens,
                                        void *const *dst, int num_pages, void *user, kvd_error *err)
{
    if (num_pages < 1) {
        kvd_error_set(err, KVD_EINVAL, "kv disk: a load of %d pages", num_pages);
        return NULL;
    }
    size_t n = (size_t)num_pages;
    size_t token_count = n * (size_t)d->cfg.block_size;
    kvd_kvdisk_load *load = calloc(1, sizeof *load + n * sizeof *load->keys + n * sizeof *load->dst +
                                          token_count * sizeof *load->tokens);
    if (!load) {
        kvd_error_set(err, KVD_ENOMEM, "kv disk: out of memory for a load of %d pages", num_pages);
        return NULL;
    }
    load->keys = (kvd_kvdisk_key *)(load + 1);
    load->dst = (void **)(load->keys + n);
    load->tokens = (int32_t *)(load->dst + n);
    memcpy(load->keys, keys, n * sizeof *keys);
    memcpy(load->dst, dst, n * sizeof *dst);
    memcpy(load->tokens, tokens, token_count * sizeof *tokens);
    load->num_pages = num_pages;
    load->user = user;
    load->queued_ns = kvd_now_ns();
    pthread_mutex_lock(&d->lock);
    if (!d->enabled) {
        pthread_mutex_unlock(&d->lock);
        free(load);
        kvd_error_set(err, KVD_ESTATE, "kv disk: the tier is off");
        return NULL;
    }
    if (d->loads_tail)
        d->loads_tail->next = load;
    else
        d->loads_head = load;
    d->loads_tail = load;
    pthread_cond_signal(&d->work);
    pthread_mutex_unlock(&d->lock);
    return load;
}

kvd_kvdisk_load *kvd_kvdisk_load_poll(kvd_kvdisk *d)
{
    pthread_mutex_lock(&d->lock);
    kvd_kvdisk_load *list = d->done_head;
    d->done_head = d->done_tail = NULL;
    pthread_mutex_unlock(&d->lock);
    return list;
}

void kvd_kvdisk_flush(kvd_kvdisk *d)
{
    pthread_mutex_lock(&d->lock);
    while (d->writes_head || d->writing)
        pthread_cond_wait(&d->progress, &d->lock);
    pthread_mutex_unlock(&d->lock);
}

void kvd_kvdisk_stats_get(kvd_kvdisk *d, kvd_kvdisk_stats *out)
{
    pthread_mutex_lock(&d->lock);
    *out = d->stats;
    pthread_mutex_unlock(&d->lock);
}

/* ---- fingerprint -------------------------------------------------------------------- */

static void hash_matrix(XXH3_state_t *st, const kvd_matrix *m)
{
    int32_t shape[3] = {(int32_t)m->dtype, m->rows, m->cols};
    XXH3_64bits_update(st, shape, sizeof shape);
    if (m->data)
        XXH3_64bits_update(st, m->data, kvd_matrix_packed_bytes(m->dtype, m->rows, m->cols));
}

static void hash_floats(XXH3_state_t *st, const float *v, int n)
{
    if (v)
        XXH3_64bits_update(st, v, (size_t)n * sizeof *v);
}

uint64_t kvd_kvdisk_fingerprint(const kvd_model *model, const kvd_tokenizer *tok, int kv_dtype, int block_size)
{
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    const kvd_model_config *c = &model->config;
    int32_t layout[8] = {kv_dtype, block_size, c->num_layers, c->num_kv_heads, c->head_dim, c->hidden_size,
                         c->vocab_size, KVD_KVDISK_VERSION};
    XXH3_64bits_update(&st, layout, sizeof layout);
    XXH3_64bits_update(&st, &c->rope_theta, sizeof c->rope_theta);
    hash_matrix(&st, &model->embed_tokens);
    if (model->lm_head.data != model->embed_tokens.data)
        hash_matrix(&st, &model->lm_head);
    hash_floats(&st, model->final_norm, c->hidden_size);
    const int q = c->num_heads * c->head_dim, kv = c->num_kv_heads * c->head_dim;
    for (int l = 0; l < c->num_layers; l++) {
        const kvd_layer_weights *w = &model->layers[l];
        hash_matrix(&st, &w->q_proj);
        hash_matrix(&st, &w->k_proj);
        hash_matrix(&st, &w->v_proj);
        hash_matrix(&st, &w->o_proj);
        hash_matrix(&st, &w->gate_proj);
        hash_matrix(&st, &w->up_proj);
        hash_matrix(&st, &w->down_proj);
        hash_floats(&st, w->q_bias, q);
        hash_floats(&st, w->k_bias, kv);
        hash_floats(&st, w->v_bias, kv);
        hash_floats(&st, w->input_norm, c->hidden_size);
        hash_floats(&st, w->post_norm, c->hidden_size);
    }
    /* The tokenizer: every id's bytes and whether it is special. */
    const int n = kvd_tokenizer_vocab_size(tok);
    for (int32_t id = 0; id < n; id++) {
        size_t len = 0;
        char *text = kvd_tokenizer_decode(tok, &id, 1, false, &len, NULL);
        uint8_t special = kvd_tokenizer_is_special(tok, id);
        XXH3_64bits_update(&st, &special, 1);
        XXH3_64bits_update(&st, &len, sizeof len);
        if (text)
            XXH3_64bits_update(&st, text, len);
        free(text);
    }
    return XXH3_64bits_digest(&st);
}
