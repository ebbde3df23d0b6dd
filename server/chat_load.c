/* chat_load.c - reading a model's chat template at start-up (the daemon's loader
 * thread): --chat-template FILE, a GGUF's template, or tokenizer_config.json. The only
 * server file besides config.c that touches the filesystem, and never while serving;
 * parsing and rendering are chat.c's.
 */
#include "chat.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static char *read_text(const char *path, size_t *len, kvd_error *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        kvd_error_set(err, KVD_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 16384;
            if (cap > (64u << 20)) {
                free(buf);
                fclose(f);
                kvd_error_set(err, KVD_EFORMAT, "%s: larger than 64 MiB", path);
                return NULL;
            }
            char *grown = realloc(buf, cap);
            if (!grown) {
                free(buf);
                fclose(f);
                kvd_error_set(err, KVD_ENOMEM, "%s: out of memory", path);
                return NULL;
            }
            buf = grown;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
    }
    bool failed = ferror(f);
    fclose(f);
    if (failed) {
        free(buf);
        kvd_error_set(err, KVD_EIO, "%s: read error", path);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* tokenizer_config.json: NULL with err->code 0 when it has no template (or no file). */
static kvd_chat_template *load_tokenizer_config(const char *model_dir, kvd_error *err)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", model_dir);
    struct stat st;
    if (stat(path, &st) != 0)
        return NULL;
    size_t len = 0;
    char *text = read_text(path, &len, err);
    if (!text)
        return NULL;
    kvd_chat_template *t = kvd_chat_template_from_tokenizer_config(text, len, path, err);
    free(text);
    return t;
}

kvd_chat_template *kvd_chat_template_load(const char *override_path, const char *gguf_template,
                                          const char *model_dir, kvd_error *err)
{
    kvd_error local = {0};
    if (!err)
        err = &local;
    err->code = 0;
    if (override_path && override_path[0]) {
        size_t len = 0;
        char *src = read_text(override_path, &len, err);
        if (!src)
            return NULL;
        char origin[4200];
        snprintf(origin, sizeof origin, "--chat-template %s", override_path);
        kvd_chat_template *t = kvd_chat_template_from_source(src, len, origin, err);
        free(src);
        if (t && model_dir) {
            /* the model's special tokens still apply */
            kvd_error ignored = {0};
            kvd_chat_template *cfg = load_tokenizer_config(model_dir, &ignored);
            if (cfg) {
                kvd_chat_template_adopt_specials(t, cfg);
                kvd_chat_template_destroy(cfg);
            }
        }
        return t;
    }
    if (gguf_template && gguf_template[0])
        return kvd_chat_template_from_source(gguf_template, strlen(gguf_template), "GGUF tokenizer.chat_template", err);
    if (model_dir) {
        struct stat st;
        if (stat(model_dir, &st) == 0 && S_ISDIR(st.st_mode)) {
            kvd_chat_template *t = load_tokenizer_config(model_dir, err);
            if (t || err->code)
                return t;
        }
    }
    return kvd_chat_template_builtin(err);
}

