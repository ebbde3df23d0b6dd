/* test_kvdisk.c - the KV disk tier's store: files, checks, eviction, lock, restart.
 *
 * Pages here are synthetic (block size 4, 256 payload bytes filled from a seed): the
 * store treats a page as opaque bytes, and the engine test covers real KV pages. Each
 * test works in its own fresh directory under $TMPDIR.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvd/kvd_kvdisk.h"

enum { BS = 4, PAGE = 256, HEADER = 72 };
#define FILE_BYTES ((uint64_t)(HEADER + BS * 4 + PAGE + 8))

typedef struct fixture {
    char dir[256];
    int warnings;
    char last_warning[768];
} fixture;

static void on_warn(void *arg, const char *msg)
{
    fixture *f = arg;
    f->warnings++;
    snprintf(f->last_warning, sizeof f->last_warning, "%s", msg);
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof f->dir, "%s/kvdisk-test-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(f->dir))
        return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", f->dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", f->dir);
    free(f);
    return 0;
}

static kvd_kvdisk *open_store(fixture *f, uint64_t fingerprint, uint64_t capacity)
{
    kvd_kvdisk_config cfg = {.dir = f->dir, .capacity_bytes = capacity, .fingerprint = fingerprint, .dtype = 1,
                             .block_size = BS, .page_bytes = PAGE, .warn = on_warn, .warn_arg = f};
    kvd_error err = {0};
    kvd_kvdisk *d = kvd_kvdisk_open(&cfg, &err);
    if (!d)
        fail_msg("open: %s", err.msg);
    return d;
}

/* Page i: key, token ids and payload derived from i (and a token variant). */
static kvd_kvdisk_key key_of(int i)
{
    return (kvd_kvdisk_key){.hash = 0x1000u + (uint64_t)i, .parent_hash = 0x2000u + (uint64_t)i,
                            .check = 0x3000u + (uint64_t)i};
}

static void tokens_of(int i, int variant, int32_t *out)
{
    for (int t = 0; t < BS; t++)
        out[t] = i * 100 + t + variant * 7;
}

static void payload_of(int i, uint8_t *out)
{
    for (int b = 0; b < PAGE; b++)
        out[b] = (uint8_t)(i * 31 + b * 7);
}

static void write_page(kvd_kvdisk *d, int i)
{
    kvd_kvdisk_key k = key_of(i);
    int32_t tok[BS];
    uint8_t data[PAGE];
    tokens_of(i, 0, tok);
    payload_of(i, data);
    assert_int_equal(kvd_kvdisk_write(d, &k, tok, data, true), 0);
}

/* The store's notify is the way to wait; a test can poll (60 s at most). */
static kvd_kvdisk_load *wait_load(kvd_kvdisk *d)
{
    for (int guard = 0; guard < 60000; guard++) {
        kvd_kvdisk_load *done = kvd_kvdisk_load_poll(d);
        if (done)
            return done;
        struct timespec ts = {0, 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    fail_msg("a load never finished");
    return NULL;
}

/* Loads page i (with the given token variant and key) synchronously; returns pages loaded. */
static int load_page_as(kvd_kvdisk *d, kvd_kvdisk_key k, int i, int variant, uint8_t *out)
{
    int32_t tok[BS];
    tokens_of(i, variant, tok);
    void *dst[1] = {out};
    kvd_error err = {0};
    kvd_kvdisk_load *l = kvd_kvdisk_load_submit(d, &k, tok, dst, 1, (void *)(intptr_t)i, &err);
    assert_non_null(l);
    kvd_kvdisk_load *done = wait_load(d);
    assert_ptr_equal(done, l);
    assert_null(done->next);
    assert_int_equal((intptr_t)done->user, i);
    int n = done->pages_loaded;
    kvd_kvdisk_load_free(done);
    return n;
}

static int load_page(kvd_kvdisk *d, int i, uint8_t *out)
{
    return load_page_as(d, key_of(i), i, 0, out);
}

static void page_path(const fixture *f, int i, char *out, size_t cap)
{
    snprintf(out, cap, "%s/%016llx.kvp", f->dir, (unsigned long long)key_of(i).hash);
}

static void test_round_trip_and_restart(void **state)
{
    fixture *f = *state;
    kvd_kvdisk *d = open_store(f, 42, 1 << 20);
    for (int i = 0; i < 5; i++)
        write_page(d, i);
    kvd_kvdisk_flush(d);
    kvd_kvdisk_stats st;
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages, 5);
    assert_int_equal(st.bytes, 5 * FILE_BYTES);
    assert_int_equal(st.pages_written, 5);
    assert_true(kvd_kvdisk_contains(d, key_of(3).hash));
    assert_false(kvd_kvdisk_contains(d, key_of(9).hash));
    uint8_t got[PAGE], want[PAGE];
    assert_int_equal(load_page(d, 3, got), 1);
    payload_of(3, want);
    assert_memory_equal(got, want, PAGE);
    /* Exactly the documented size on disk. */
    char path[512];
    page_path(f, 3, path, sizeof path);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal((uint64_t)sb.st_size, FILE_BYTES);
    kvd_kvdisk_close(d);

    /* Restart: the index is rebuilt from the files, every page still loads. */
    d = open_store(f, 42, 1 << 20);
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages, 5);
    for (int i = 0; i < 5; i++) {
        memset(got, 0, sizeof got);
        assert_int_equal(load_page(d, i, got), 1);
        payload_of(i, want);
        assert_memory_equal(got, want, PAGE);
    }
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages_read, 5);
    assert_int_equal(st.loads, 5);
    assert_int_equal(f->warnings, 0);
    kvd_kvdisk_close(d);
}

static void test_multi_page_load_stops_at_first_missing(void **state)
{
    fixture *f = *state;
    kvd_kvdisk *d = open_store(f, 42, 1 << 20);
    write_page(d, 0);
    write_page(d, 1);
    write_page(d, 3);
    kvd_kvdisk_flush(d);
    kvd_kvdisk_key keys[4];
    int32_t tok[4 * BS];
    uint8_t bufs[4][PAGE];
    void *dst[4];
    for (int i = 0; i < 4; i++) {
        keys[i] = key_of(i);
        tokens_of(i, 0, tok + i * BS);
        dst[i] = bufs[i];
    }
    kvd_kvdisk_load *l = kvd_kvdisk_load_submit(d, keys, tok, dst, 4, NULL, NULL);
    assert_non_null(l);
    kvd_kvdisk_load *done = wait_load(d);
    assert_int_equal(done->pages_loaded, 2); /* page 2 is missing: 3 is never served out of order */
    uint8_t want[PAGE];
    payload_of(1, want);
    assert_memory_equal(bufs[1], want, PAGE);
    kvd_kvdisk_load_free(done);
    kvd_kvdisk_close(d);
}

static void test_truncated_file(void **state)
{
    fixture *f = *state;
    kvd_kvdisk *d = open_store(f, 42, 1 << 20);
    write_page(d, 0);
    write_page(d, 1);
    kvd_kvdisk_flush(d);
    char path[512];
    page_path(f, 0, path, sizeof path);
    assert_int_equal(truncate(path, (off_t)FILE_BYTES - 100), 0);
    uint8_t got[PAGE];
    /* While open: the load refuses it and drops the file. */
    assert_int_equal(load_page(d, 0, got), 0);
    assert_false(kvd_kvdisk_contains(d, key_of(0).hash));
    assert_int_equal(access(path, F_OK), -1);
    kvd_kvdisk_stats st;
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages_corrupt, 1);
    assert_int_equal(st.pages, 1);
    kvd_kvdisk_close(d);

    /* At open: a torn file (here: cut inside the header) is not indexed. */
    page_path(f, 1, path, sizeof path);
    assert_int_equal(truncate(path, 40), 0);
    d = open_store(f, 42, 1 << 20);
    assert_false(kvd_kvdisk_contains(d, key_of(1).hash));
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages, 0);
    kvd_kvdisk_close(d);
}

static void flip_bit(const char *path, off_t offset)
{
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    uint8_t b;
    assert_int_equal(pread(fd, &b, 1, offset), 1);
    b ^= 0x10;
    assert_int_equal(pwrite(fd, &b, 1, offset), 1);
    close(fd);
}

static void test_flipped_bit(void **state)
{
    fixture *f = *state;
    kvd_kvdisk *d = open_store(f, 42, 1 << 20);
    for (int i = 0; i < 3; i++)
        write_page(d, i);
    kvd_kvdisk_flush(d);
    char path[512];
    /* A bit in the payload, one in a token id, one in the checksum itself. */
    const off_t where[3] = {HEADER + BS * 4 + 100, HEADER + 5, (off_t)FILE_BYTES - 3};
    for (int i = 0; i < 3; i++) {
        page_path(f, i, path, sizeof path);
        flip_bit(path, where[i]);
        uint8_t got[PAGE];
        assert_int_equal(load_page(d, i, got), 0);
        assert_false(kvd_kvdisk_contains(d, key_of(i).hash));
    }
    kvd_kvdisk_stats st;
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages_corrupt, 3);
    assert_int_equal(st.pages_read, 0);
    assert_int_equal(st.pages, 0);
    kvd_kvdisk_close(d);
}

static void test_wrong_fingerprint_ignored(void **state)
{
    fixture *f = *state;
    kvd_kvdisk *d = open_store(f, 42, 1 << 20);
    write_page(d, 0);
    write_page(d, 1);
    kvd_kvdisk_close(d); /* close finishes queued writes */
    d = open_store(f, 43, 1 << 20);
    assert_false(kvd_kvdisk_contains(d, key_of(0).hash));
    kvd_kvdisk_stats st;
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages, 0);
    assert_int_equal(st.files_ignored, 2);
    assert_int_equal(f->warnings, 1); /* one line for all of them */
    assert_non_null(strstr(f->last_warning, "ignored 2 page file"));
    kvd_kvdisk_close(d);
    /* They were left alone: the right model finds them again. */
    d = open_store(f, 42, 1 << 20);
    assert_true(kvd_kvdisk_contains(d, key_of(1).hash));
    kvd_kvdisk_close(d);
}

static void test_lru_eviction_at_capacity(void **state)
{
    fixture *f = *state;
    kvd_kvdisk *d = open_store(f, 42, 3 * FILE_BYTES);
    for (int i = 0; i < 3; i++)
        write_page(d, i);
    kvd_kvdisk_flush(d);
    uint8_t got[PAGE];
    assert_int_equal(load_page(d, 0, got), 1); /* page 0 becomes the most recently used */
    write_page(d, 3);
    kvd_kvdisk_flush(d);
    assert_true(kvd_kvdisk_contains(d, key_of(0).hash));
    assert_false(kvd_kvdisk_contains(d, key_of(1).hash)); /* the least recently used went */
    assert_true(kvd_kvdisk_contains(d, key_of(2).hash));
    assert_true(kvd_kvdisk_contains(d, key_of(3).hash));
    char path[512];
    page_path(f, 1, path, sizeof path);
    assert_int_equal(access(path, F_OK), -1);
    kvd_kvdisk_stats st;
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages, 3);
    assert_true((uint64_t)st.bytes <= 3 * FILE_BYTES);
    assert_int_equal(st.pages_evicted, 1);
    kvd_kvdisk_close(d);

    /* A smaller capacity at the next start keeps the most recently used. */
    d = open_store(f, 42, 2 * FILE_BYTES);
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages, 2);
    assert_true(kvd_kvdisk_contains(d, key_of(3).hash));
    kvd_kvdisk_close(d);
}

static void test_hash_collision_never_served(void **state)
{
    fixture *f = *state;
    kvd_kvdisk *d = open_store(f, 42, 1 << 20);
    write_page(d, 0);
    kvd_kvdisk_flush(d);
    uint8_t got[PAGE];
    /* Same hash, other token ids. */
    assert_int_equal(load_page_as(d, key_of(0), 0, 1, got), 0);
    /* Same hash and ids, another parent or second chain. */
    kvd_kvdisk_key k = key_of(0);
    k.parent_hash ^= 1;
    assert_int_equal(load_page_as(d, k, 0, 0, got), 0);
    k = key_of(0);
    k.check ^= 1;
    assert_int_equal(load_page_as(d, k, 0, 0, got), 0);
    kvd_kvdisk_stats st;
    kvd_kvdisk_stats_get(d, &st);
    assert_int_equal(st.pages_mismatch, 3);
    assert_int_equal(st.pages_read, 0);
    /* The page itself is fine and stays for its own prefix. */
    assert_int_equal(load_page(d, 0, got), 1);
    /* A second write under the same hash does not replace it. */
    kvd_kvdisk_key same = key_of(0);
    int32_t other[BS];
    uint8_t data[PAGE] = {0};
    tokens_of(0, 1, other);
    assert_int_equal(kvd_kvdisk_write(d, &same, other, data, true), 0);
    kvd_kvdisk_flush(d);
    assert_int_equal(load_page(d, 0, got), 1);
    kvd_kvdisk_close(d);
}

static void test_second_store_refused(void **state)
{
    fixture *f = *state;
    kvd_kvdisk *d = open_store(f, 42, 1 << 20);
    kvd_kvdisk_config cfg = {.dir = f->dir, .capacity_bytes = 1 << 20, .fingerprint = 42, .dtype = 1,
                             .block_size = BS, .page_bytes = PAGE};
    kvd_error err = {0};
    assert_null(kvd_kvdisk_open(&cfg, &err));
    assert_int_equal(err.code, KVD_EBUSY);
    assert_non_null(strstr(err.msg, "in use"));
    kvd_kvdisk_close(d);
    kvd_kvdisk *again = kvd_kvdisk_open(&cfg, &err); /* free once the first is closed */
    assert_non_null(again);
    kvd_kvdisk_close(again);
}

static void test_dir_removed_disables(void **state)
{
    fixture *f = *state;
    kvd_kvdisk *d = open_store(f, 42, 1 << 20);
    write_page(d, 0);
    kvd_kvdisk_flush(d);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", f->dir);
    assert_int_equal(system(cmd), 0);
    write_page(d, 1);
    kvd_kvdisk_flush(d);
    kvd_kvdisk_stats st;
    kvd_kvdisk_stats_get(d, &st);
    assert_false(st.enabled);
    assert_int_equal(f->warnings, 1);
    assert_non_null(strstr(f->last_warning, "disk tier is off"));
    assert_false(kvd_kvdisk_contains(d, key_of(0).hash));
    /* Off means quiet: writes and loads are refused without more warnings. */
    kvd_kvdisk_key k = key_of(2);
    int32_t tok[BS] = {0};
    uint8_t data[PAGE] = {0};
    assert_int_equal(kvd_kvdisk_write(d, &k, tok, data, false), KVD_ESTATE);
    void *dst[1] = {data};
    assert_null(kvd_kvdisk_load_submit(d, &k, tok, dst, 1, NULL, NULL));
    assert_int_equal(f->warnings, 1);
    kvd_kvdisk_close(d);
}

static void test_unwritable_dir(void **state)
{
    fixture *f = *state;
    char path[512];
    snprintf(path, sizeof path, "%s/file", f->dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fclose(fp);
    kvd_kvdisk_config cfg = {.dir = path, .capacity_bytes = 1 << 20, .fingerprint = 42, .dtype = 1,
                             .block_size = BS, .page_bytes = PAGE};
    kvd_error err = {0};
    assert_null(kvd_kvdisk_open(&cfg, &err)); /* a file where the directory should be */
    assert_int_equal(err.code, KVD_EIO);
    snprintf(path, sizeof path, "%s/no/such/dir", f->dir);
    assert_null(kvd_kvdisk_open(&cfg, &err));
    assert_int_equal(err.code, KVD_EIO);
}

static void test_leftover_temp_files_removed(void **state)
{
    fixture *f = *state;
    char path[512];
    snprintf(path, sizeof path, "%s/.tmp-0000000000001000.kvp", f->dir);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("half a page", fp);
    fclose(fp);
    kvd_kvdisk *d = open_store(f, 42, 1 << 20);
    assert_int_equal(access(path, F_OK), -1);
    assert_false(kvd_kvdisk_contains(d, key_of(0).hash));
    kvd_kvdisk_close(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip_and_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_multi_page_load_stops_at_first_missing, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncated_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flipped_bit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_fingerprint_ignored, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lru_eviction_at_capacity, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hash_collision_never_served, setup, teardown),
        cmocka_unit_test_setup_teardown(test_second_store_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dir_removed_disables, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unwritable_dir, setup, teardown),
        cmocka_unit_test_setup_teardown(test_leftover_temp_files_removed, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
