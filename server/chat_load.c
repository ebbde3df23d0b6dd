/* chat_load.c - reading a model's chat template at start-up (the daemon's loader
 * thread): --chat-template FILE, a GGUF's template, or tokenizer_config.json. The only
 * server file besides config.c that touches the filesystem, and never while serving;
 * parsing and rendering are chat.c's.
 */
#include "chat.h"

#include "kvd/kvd_buf.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The whole file at path (NUL-terminated), or NULL with err set. */
static char *read_text(const char *path, size_t *len, kvd_error *err)
{
    kvd_sbuf text;
    kvd_sbuf_init(&text);
    if (kvd_sbuf_read_file(&text, path, err) != 0) {
        kvd_sbuf_deinit(&text);
        return NULL;
    }
    return kvd_sbuf_take(&text, len);
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

