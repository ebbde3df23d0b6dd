/* test_files.h - whole-file reads for the unit tests (include after <cmocka.h>).
 *
 * Both return a malloc'ed buffer with a NUL after the last byte (free it) and store
 * the length in *len when len is not NULL (0 when the file cannot be read).
 */
#ifndef KVD_TEST_FILES_H
#define KVD_TEST_FILES_H

#include <stdio.h>
#include <stdlib.h>

/* NULL when the file cannot be read (for group setups, which report and return -1). */
static inline char *test_read_file(const char *path, size_t *len)
{
    if (len)
        *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    long n = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    if (n >= 0 && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1)) != NULL &&
        fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        if (len)
            *len = (size_t)n;
    }
    return buf;
}

/* Fails the running test when the file cannot be read. */
static inline char *test_must_read_file(const char *path, size_t *len)
{
    char *buf = test_read_file(path, len);
    if (!buf)
        fail_msg("cannot read %s", path);
    return buf;
}

#endif
