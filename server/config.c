/* config.c - knob table, JSON config files, command-line flags and --help.
 *
 * Each knob is one row: its JSON key, the type that says how to parse and store it,
 * its offset in kvd_server_config and its range. Flags are the keys with '-' for '_'
 * (--max-num-seqs), plus a few spellings the brief asks for (--kv-cache-mb,
 * --no-prefix-cache). Parsing works on a copy, so a failed file or flag leaves the
 * caller's configuration as it was.
 */
#include "config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "http.h"
#include "kvd/kvd_engine.h"
#include "kvd/kvd_gguf.h"

enum knob_kind {
    KNOB_STR,      /* char[cap] */
    KNOB_INT,      /* int */
    KNOB_U64,      /* uint64_t */
    KNOB_MIB,      /* uint64_t holding bytes, given in MiB */
    KNOB_BOOL,     /* bool */
    KNOB_DTYPE,    /* kvd_dtype */
    KNOB_LOGLEVEL, /* kvd_log_level */
};

typedef struct knob {
    const char *key;
    enum knob_kind kind;
    size_t offset;
    size_t cap;         /* KNOB_STR: buffer size */
    long long min, max; /* numeric kinds */
    const char *arg;    /* placeholder in --help */
    const char *help;
} knob;

#define OFF(field) offsetof(kvd_server_config, field)
#define CAP(field) sizeof(((kvd_server_config *)0)->field)
#define MAX_SAFE_INT 9007199254740992LL /* 2^53: JSON numbers are doubles */

static const knob knobs[] = {
    {"host", KNOB_STR, OFF(host), CAP(host), 0, 0, "ADDR", "address to listen on: an IPv4 or IPv6 literal, or a host name (localhost)"},
    {"port", KNOB_INT, OFF(port), 0, 0, 65535, "N", "TCP port; 0 picks a free one (printed in the banner)"},
    {"model", KNOB_STR, OFF(model), CAP(model), 0, 0, "PATH", "checkpoint directory (config.json, *.safetensors, tokenizer.json) or GGUF file"},
    {"served_model_name", KNOB_STR, OFF(served_model_name), CAP(served_model_name), 0, 0, "NAME", "model id in responses and /v1/models; more names after commas are aliases requests may use; empty: the model directory's name"},
    {"chat_template", KNOB_STR, OFF(chat_template), CAP(chat_template), 0, 0, "FILE", "Jinja chat template used instead of the model's own (tokenizer_config.json, GGUF); empty: the model's, else the built-in ChatML fallback"},
    {"block_size", KNOB_INT, OFF(block_size), 0, 1, 256, "N", "tokens per KV block (power of two)"},
    {"kv_cache_bytes", KNOB_U64, OFF(kv_cache_bytes), 0, 1, MAX_SAFE_INT, "BYTES", "KV pool budget in bytes"},
    {"kv_cache_mb", KNOB_MIB, OFF(kv_cache_bytes), 0, 1, 1LL << 33, "MIB", "KV pool budget in MiB (alternative to kv_cache_bytes)"},
    {"kv_num_blocks", KNOB_U64, OFF(kv_num_blocks), 0, 0, 1LL << 31, "N", "exact KV pool size in blocks; 0: from the byte budget"},
    {"kv_dtype", KNOB_DTYPE, OFF(kv_dtype), 0, 0, 0, "f16|bf16|f32|int8|fp8", "element type of cached keys and values (int8, fp8 (e4m3): 8-bit pages with a scale per token and head, 1.94x the tokens of f16)"},
    {"kv_disk", KNOB_STR, OFF(kv_disk), CAP(kv_disk), 0, 0, "DIR", "directory of the KV disk tier: pages the prefix cache evicts are kept there (and the RAM pages at shutdown), found again by later prompts and after a restart with the same model, tokenizer and KV layout; one daemon per directory; empty: no disk tier"},
    {"kv_disk_gb", KNOB_INT, OFF(kv_disk_gb), 0, 1, 1 << 20, "GIB", "size cap of the KV disk tier's files in GiB (least recently used pages are removed first)"},
    {"quantize", KNOB_STR, OFF(quantize), CAP(quantize), 0, 0, "TYPE", "convert the weights to this type while loading (q8_0, q4_0, q4_k_m, ...; as kvd-quantize --type); empty: as stored"},
    {"max_num_seqs", KNOB_INT, OFF(max_num_seqs), 0, 1, 4096, "N", "sequences running at once"},
    {"max_batched_tokens", KNOB_INT, OFF(max_batched_tokens), 0, 1, 1 << 20, "N", "tokens per engine step (decode plus prefill chunks)"},
    {"prefill_pack_tokens", KNOB_INT, OFF(prefill_pack_tokens), 0, 0, 1 << 20, "N", "no further prompt joins an engine step whose prefill chunks hold this many tokens (so prompts that arrive together get their first tokens one after another, not all at the end of one long step); 0: fill max_batched_tokens"},
    {"max_queue", KNOB_INT, OFF(max_queue), 0, 0, 1 << 20, "N", "waiting requests before 429; 0: unbounded (the engine's own default)"},
    {"max_body_bytes", KNOB_U64, OFF(max_body_bytes), 0, 1024, 1LL << 32, "BYTES", "largest request body (413 above)"},
    {"max_header_bytes", KNOB_U64, OFF(max_header_bytes), 0, 1024, 1 << 24, "BYTES", "largest request line plus headers (431 above)"},
    {"header_timeout_ms", KNOB_U64, OFF(header_timeout_ms), 0, 1, 86400000, "MS", "time allowed from connect (or a request's first byte) to the end of its headers"},
    {"idle_timeout_ms", KNOB_U64, OFF(idle_timeout_ms), 0, 1, 86400000, "MS", "idle keep-alive connections (and stalled bodies) are closed after this"},
    {"body_timeout_ms", KNOB_U64, OFF(body_timeout_ms), 0, 1, 86400000, "MS", "time allowed from the end of a request's headers to the end of its body, however steadily it arrives"},
    {"max_connections", KNOB_INT, OFF(max_connections), 0, 1, 1 << 20, "N", "open connections; more are answered 503 and closed"},
    {"max_write_queue_bytes", KNOB_U64, OFF(max_write_queue_bytes), 0, 4096, 1LL << 32, "BYTES", "unsent bytes a stream may queue before its client is cut off"},
    {"max_response_bytes", KNOB_U64, OFF(max_response_bytes), 0, 4096, 1LL << 32, "BYTES", "largest whole (non-streamed) response a request may build; larger ones are refused with 400 (stream them instead)"},
    {"socket_send_buffer_bytes", KNOB_U64, OFF(socket_send_buffer_bytes), 0, 0, 1 << 30, "BYTES", "SO_SNDBUF of client sockets (bounds kernel buffering for slow readers); 0: kernel autotuning (up to tcp_wmem's maximum, 4 MiB by default, per connection)"},
    {"send_timeout_ms", KNOB_U64, OFF(send_timeout_ms), 0, 0, 86400000, "MS", "an answer whose client takes none of its bytes for this long is cut and its connection closed (a client that pipelines and never reads); 0: none"},
    {"max_buffered_body_bytes", KNOB_U64, OFF(max_buffered_body_bytes), 0, 1024, 1LL << 40, "BYTES", "request body bytes held across all connections; a request that would pass it gets 503 with Retry-After: 1 (at least max_body_bytes)"},
    {"allowed_hosts", KNOB_STR, OFF(allowed_hosts), CAP(allowed_hosts), 0, 0, "LIST", "comma-separated Host names served (port ignored, IPv6 in brackets); \"*\": any; empty: localhost,127.0.0.1,[::1] on a loopback address, any otherwise; others get 403 (DNS rebinding)"},
    {"allowed_origins", KNOB_STR, OFF(allowed_origins), CAP(allowed_origins), 0, 0, "LIST", "comma-separated origins (https://app.example:8443) whose browser pages may call the API, with CORS headers and preflights; \"*\": any; empty: only the daemon's own pages; other Origins get 403"},
    {"drain_timeout_s", KNOB_INT, OFF(drain_timeout_s), 0, 0, 86400, "S", "grace period for in-flight requests after SIGINT/SIGTERM"},
    {"api_key", KNOB_STR, OFF(api_key), CAP(api_key), 0, 0, "KEY", "require Authorization: Bearer KEY on /v1/*, /tokenize and /detokenize; empty: no key"},
    {"threads", KNOB_INT, OFF(threads), 0, 0, 1024, "N", "compute threads; 0: all cores"},
    {"enable_prefix_cache", KNOB_BOOL, OFF(enable_prefix_cache), 0, 0, 0, NULL, "reuse cached KV blocks of shared prompt prefixes"},
    {"log_level", KNOB_LOGLEVEL, OFF(log_level), 0, 0, 0, "debug|info|warn|error", "least severe log level written to stderr"},
};

#define NUM_KNOBS (sizeof knobs / sizeof knobs[0])

void kvd_config_defaults(kvd_server_config *cfg)
{
    /* The engine's knobs default to what the engine itself defaults to. */
    const kvd_engine_config engine = KVD_ENGINE_CONFIG_DEFAULT;
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->host, sizeof cfg->host, "127.0.0.1");
    cfg->port = 8000;
    cfg->block_size = engine.block_size;
    cfg->kv_cache_bytes = engine.kv_cache_bytes;
    cfg->kv_num_blocks = engine.kv_num_blocks;
    cfg->kv_dtype = engine.kv_dtype;
    cfg->kv_disk_gb = 8;
    cfg->max_num_seqs = engine.max_num_seqs;
    cfg->max_batched_tokens = engine.max_batched_tokens;
    cfg->prefill_pack_tokens = engine.prefill_pack_tokens;
    cfg->max_queue = engine.max_queue;
    cfg->max_body_bytes = 4ull << 20;
    cfg->max_header_bytes = 32u << 10;
    cfg->header_timeout_ms = 10000;
    cfg->idle_timeout_ms = 60000;
    cfg->body_timeout_ms = 30000;
    cfg->max_connections = 1024;
    cfg->max_write_queue_bytes = 1u << 20;
    cfg->max_response_bytes = 32u << 20;
    cfg->drain_timeout_s = 30;
    const kvd_http_limits http = kvd_http_limits_default();
    cfg->send_timeout_ms = http.send_timeout_ms;
    cfg->max_buffered_body_bytes = http.max_buffered_body_bytes;
    cfg->threads = engine.num_threads;
    cfg->enable_prefix_cache = engine.enable_prefix_cache;
    cfg->log_level = KVD_LOG_INFO;
}

static const knob *knob_by_key(const char *key)
{
    for (size_t i = 0; i < NUM_KNOBS; i++)
        if (strcmp(knobs[i].key, key) == 0)
            return &knobs[i];
    return NULL;
}

/* "--max-num-seqs" -> the knob "max_num_seqs". */
static const knob *knob_by_flag(const char *flag, size_t len)
{
    char key[64];
    if (len >= sizeof key)
        return NULL;
    for (size_t i = 0; i < len; i++)
        key[i] = flag[i] == '-' ? '_' : flag[i];
    key[len] = '\0';
    return knob_by_key(key);
}

static int store_integer(kvd_server_config *cfg, const knob *k, long long value, const char *where,
                         kvd_error *err)
{
    if (value < k->min || value > k->max)
        return kvd_error_set(err, KVD_EINVAL, "%s: must be an integer in %lld..%lld", where, k->min, k->max);
    char *base = (char *)cfg + k->offset;
    switch (k->kind) {
    case KNOB_INT:
        *(int *)base = (int)value;
        break;
    case KNOB_U64:
        *(uint64_t *)base = (uint64_t)value;
        break;
    case KNOB_MIB:
        *(uint64_t *)base = (uint64_t)value << 20;
        break;
    default:
        return kvd_error_set(err, KVD_EINVAL, "%s: not a number", where);
    }
    return 0;
}

/* Parses the text form of a knob's value (flags; also strings for enums in files). */
static int store_text(kvd_server_config *cfg, const knob *k, const char *text, const char *where,
                      kvd_error *err)
{
    char *base = (char *)cfg + k->offset;
    switch (k->kind) {
    case KNOB_STR:
        if (strlen(text) >= k->cap)
            return kvd_error_set(err, KVD_EINVAL, "%s: longer than %zu bytes", where, k->cap - 1);
        memcpy(base, text, strlen(text) + 1);
        return 0;
    case KNOB_INT:
    case KNOB_U64:
    case KNOB_MIB: {
        errno = 0;
        char *end;
        long long value = strtoll(text, &end, 10);
        if (errno || end == text || *end != '\0')
            return kvd_error_set(err, KVD_EINVAL, "%s: \"%s\" is not an integer", where, text);
        return store_integer(cfg, k, value, where, err);
    }
    case KNOB_BOOL:
        if (strcmp(text, "true") == 0 || strcmp(text, "1") == 0) {
            *(bool *)base = true;
            return 0;
        }
        if (strcmp(text, "false") == 0 || strcmp(text, "0") == 0) {
            *(bool *)base = false;
            return 0;
        }
        return kvd_error_set(err, KVD_EINVAL, "%s: \"%s\" is not true or false", where, text);
    case KNOB_DTYPE:
        if (kvd_dtype_parse(text, (kvd_dtype *)base) != 0 || kvd_dtype_is_quantized(*(kvd_dtype *)base))
            return kvd_error_set(err, KVD_EINVAL, "%s: \"%s\" is not one of f16, bf16, f32, int8, fp8", where, text);
        return 0;
    case KNOB_LOGLEVEL:
        if (kvd_log_level_parse(text, (kvd_log_level *)base) != 0)
            return kvd_error_set(err, KVD_EINVAL, "%s: \"%s\" is not one of debug, info, warn, error",
                                 where, text);
        return 0;
    }
    return kvd_error_set(err, KVD_EINVAL, "%s: unsupported", where);
}

static int store_json(kvd_server_config *cfg, const knob *k, const cJSON *value, const char *where,
                      kvd_error *err)
{
    switch (k->kind) {
    case KNOB_STR:
    case KNOB_DTYPE:
    case KNOB_LOGLEVEL:
        if (!cJSON_IsString(value))
            return kvd_error_set(err, KVD_EINVAL, "%s: must be a string", where);
        return store_text(cfg, k, value->valuestring, where, err);
    case KNOB_INT:
    case KNOB_U64:
    case KNOB_MIB: {
        if (!cJSON_IsNumber(value))
            return kvd_error_set(err, KVD_EINVAL, "%s: must be an integer", where);
        double d = value->valuedouble;
        if (!isfinite(d) || d != floor(d) || d < -(double)MAX_SAFE_INT || d > (double)MAX_SAFE_INT)
            return kvd_error_set(err, KVD_EINVAL, "%s: must be an integer in %lld..%lld", where, k->min, k->max);
        return store_integer(cfg, k, (long long)d, where, err);
    }
    case KNOB_BOOL:
        if (!cJSON_IsBool(value))
            return kvd_error_set(err, KVD_EINVAL, "%s: must be true or false", where);
        *(bool *)((char *)cfg + k->offset) = cJSON_IsTrue(value);
        return 0;
    }
    return kvd_error_set(err, KVD_EINVAL, "%s: unsupported", where);
}

int kvd_config_apply_json(kvd_server_config *cfg, const char *text, size_t len, const char *path,
                          kvd_error *err)
{
    cJSON *root = cJSON_ParseWithLength(text, len);
    if (!root)
        return kvd_error_set(err, KVD_EFORMAT, "%s: not valid JSON (near byte %td)", path,
                             cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() - text : (ptrdiff_t)0);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return kvd_error_set(err, KVD_EFORMAT, "%s: must hold a JSON object", path);
    }
    kvd_server_config work = *cfg;
    bool saw_bytes = false, saw_mib = false;
    int rc = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, root) {
        char where[KVD_CONFIG_PATH_MAX + 80];
        snprintf(where, sizeof where, "%s: key \"%s\"", path, item->string);
        const knob *k = knob_by_key(item->string);
        if (!k) {
            rc = kvd_error_set(err, KVD_EINVAL, "%s: unknown key \"%s\"", path, item->string);
            break;
        }
        saw_bytes |= strcmp(k->key, "kv_cache_bytes") == 0;
        saw_mib |= k->kind == KNOB_MIB;
        rc = store_json(&work, k, item, where, err);
        if (rc)
            break;
    }
    if (rc == 0 && saw_bytes && saw_mib)
        rc = kvd_error_set(err, KVD_EINVAL, "%s: keys \"kv_cache_bytes\" and \"kv_cache_mb\" both set; keep one",
                           path);
    cJSON_Delete(root);
    if (rc == 0)
        *cfg = work;
    return rc;
}

int kvd_config_load_file(kvd_server_config *cfg, const char *path, kvd_error *err)
{
    kvd_sbuf text;
    kvd_sbuf_init(&text);
    int rc = kvd_sbuf_read_file(&text, path, err);
    if (rc == 0)
        rc = kvd_config_apply_json(cfg, text.data, text.len, path, err);
    kvd_sbuf_deinit(&text);
    if (rc == 0 && strlen(path) < sizeof cfg->config_path)
        memcpy(cfg->config_path, path, strlen(path) + 1);
    return rc;
}

/* Splits "--name=value" or "--name value"; returns the value or NULL when missing. */
static const char *flag_value(int argc, char **argv, int *i, const char *eq)
{
    if (eq)
        return eq + 1;
    if (*i + 1 < argc) {
        (*i)++;
        return argv[*i];
    }
    return NULL;
}

int kvd_config_from_args(kvd_server_config *cfg, int argc, char **argv, bool *show_help,
                         kvd_error *err)
{
    *show_help = false;
    kvd_server_config work;
    kvd_config_defaults(&work);
    /* The file first, wherever --config stands, so that flags always win over it. */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            *show_help = true;
            return 0;
        }
    }
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *eq = strchr(arg, '=');
        if (strncmp(arg, "--config", 8) == 0 && (arg[8] == '\0' || arg[8] == '=')) {
            const char *path = flag_value(argc, argv, &i, arg[8] == '=' ? eq : NULL);
            if (!path)
                return kvd_error_set(err, KVD_EINVAL, "--config: needs a FILE");
            int rc = kvd_config_load_file(&work, path, err);
            if (rc)
                return rc;
        }
    }
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0)
            return kvd_error_set(err, KVD_EINVAL, "unexpected argument \"%s\" (see --help)", arg);
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
        if (name_len == 6 && strncmp(name, "config", 6) == 0) {
            if (!eq)
                i++;
            continue;
        }
        if (name_len == 15 && strncmp(name, "no-prefix-cache", 15) == 0 && !eq) {
            work.enable_prefix_cache = false;
            continue;
        }
        const knob *k = knob_by_flag(name, name_len);
        if (!k)
            return kvd_error_set(err, KVD_EINVAL, "unknown flag --%.*s (see --help)", (int)name_len, name);
        char where[96];
        snprintf(where, sizeof where, "--%.*s", (int)name_len, name);
        if (k->kind == KNOB_BOOL && !eq) {
            *(bool *)((char *)&work + k->offset) = true;
            continue;
        }
        const char *value = flag_value(argc, argv, &i, eq);
        if (!value)
            return kvd_error_set(err, KVD_EINVAL, "%s: needs a value", where);
        int rc = store_text(&work, k, value, where, err);
        if (rc)
            return rc;
    }
    *cfg = work;
    return 0;
}

int kvd_config_validate(const kvd_server_config *cfg, kvd_error *err)
{
    if (cfg->model[0] == '\0')
        return kvd_error_set(err, KVD_EINVAL, "model: not set (use --model DIR or the \"model\" key)");
    struct stat st;
    if (stat(cfg->model, &st) != 0 && errno == ELOOP)
        return kvd_error_set(err, KVD_EINVAL, "model: %s is a symbolic link loop (%s)", cfg->model, strerror(ELOOP));
    if (stat(cfg->model, &st) != 0 || (!S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode)))
        return kvd_error_set(err, KVD_EINVAL, "model: %s is not a directory or a file", cfg->model);
    if (cfg->host[0] == '\0')
        return kvd_error_set(err, KVD_EINVAL, "host: empty");
    if (cfg->max_buffered_body_bytes < cfg->max_body_bytes)
        return kvd_error_set(err, KVD_EINVAL, "max_buffered_body_bytes: %" PRIu64 " is below max_body_bytes (%" PRIu64 ")",
                             cfg->max_buffered_body_bytes, cfg->max_body_bytes);
    if (cfg->quantize[0] && !kvd_gguf_mix_find(cfg->quantize))
        return kvd_error_set(err, KVD_EINVAL, "quantize: \"%s\" is not one of %s", cfg->quantize,
                             kvd_gguf_mix_names());
    if (cfg->block_size & (cfg->block_size - 1))
        return kvd_error_set(err, KVD_EINVAL, "block_size: %d is not a power of two", cfg->block_size);
    if (cfg->kv_cache_bytes == 0 && cfg->kv_num_blocks == 0)
        return kvd_error_set(err, KVD_EINVAL, "kv_cache_bytes: must be positive");
    return 0;
}

/* The flag of a knob with its placeholder: "--max-num-seqs N". */
static void knob_flag(const knob *k, char *out, size_t cap)
{
    if (k->kind == KNOB_BOOL)
        snprintf(out, cap, "--%s", k->key);
    else
        snprintf(out, cap, "--%s %s", k->key, k->arg);
    for (char *p = out + 2; *p && *p != ' '; p++)
        if (*p == '_')
            *p = '-';
}

static void describe_default(const kvd_server_config *defaults, const knob *k, char *out, size_t cap)
{
    const char *base = (const char *)defaults + k->offset;
    switch (k->kind) {
    case KNOB_STR:
        snprintf(out, cap, "\"%s\"", base);
        break;
    case KNOB_INT:
        snprintf(out, cap, "%d", *(const int *)base);
        break;
    case KNOB_U64:
        snprintf(out, cap, "%" PRIu64, *(const uint64_t *)base);
        break;
    case KNOB_MIB:
        snprintf(out, cap, "%" PRIu64, *(const uint64_t *)base >> 20);
        break;
    case KNOB_BOOL:
        snprintf(out, cap, "%s", *(const bool *)base ? "true" : "false");
        break;
    case KNOB_DTYPE:
        snprintf(out, cap, "%s", kvd_dtype_name(*(const kvd_dtype *)base));
        break;
    case KNOB_LOGLEVEL:
        snprintf(out, cap, "%s", kvd_log_level_name(*(const kvd_log_level *)base));
        break;
    }
}

void kvd_config_print_help(FILE *out, const char *prog)
{
    kvd_server_config defaults;
    kvd_config_defaults(&defaults);
    fprintf(out,
            "usage: %s --model DIR|FILE.gguf [--config FILE] [flags]\n"
            "\n"
            "kvd serves a Qwen2-family model over an OpenAI-compatible HTTP API.\n"
            "Flags override the config file; each flag is also a key of the file\n"
            "(the flag's name with '_' for '-').\n"
            "\n"
            "  --config FILE            JSON config file (keys below)\n"
            "  --help, -h               this text\n"
            "  --print-knobs json|md    every knob with its default, as a config file or a\n"
            "                           markdown table (docs/operations.md), then exit\n",
            prog);
    for (size_t i = 0; i < NUM_KNOBS; i++) {
        const knob *k = &knobs[i];
        char flag[96], def[160];
        knob_flag(k, flag, sizeof flag);
        describe_default(&defaults, k, def, sizeof def);
        fprintf(out, "  %-24s %s [default %s]\n", flag, k->help, def);
        if (strcmp(k->key, "enable_prefix_cache") == 0)
            fprintf(out, "  %-24s %s\n", "--no-prefix-cache", "turn the prefix cache off");
    }
}

int kvd_config_print_knobs(FILE *out, const char *format)
{
    kvd_server_config defaults;
    kvd_config_defaults(&defaults);
    if (strcmp(format, "json") == 0) {
        /* A config file with every key at its default (kv_cache_bytes is given as
         * kv_cache_mb, its other unit: a file may hold only one of the two). */
        fprintf(out, "{\n");
        bool first = true;
        for (size_t i = 0; i < NUM_KNOBS; i++) {
            const knob *k = &knobs[i];
            if (strcmp(k->key, "kv_cache_bytes") == 0)
                continue;
            char def[KVD_CONFIG_PATH_MAX + 8];
            describe_default(&defaults, k, def, sizeof def);
            bool quoted = k->kind == KNOB_DTYPE || k->kind == KNOB_LOGLEVEL;
            fprintf(out, "%s  \"%s\": %s%s%s", first ? "" : ",\n", k->key, quoted ? "\"" : "", def, quoted ? "\"" : "");
            first = false;
        }
        fprintf(out, "\n}\n");
        return 0;
    }
    if (strcmp(format, "md") == 0) {
        fprintf(out, "| key / flag | default | meaning |\n|---|---|---|\n");
        for (size_t i = 0; i < NUM_KNOBS; i++) {
            const knob *k = &knobs[i];
            char flag[96], def[KVD_CONFIG_PATH_MAX + 8];
            knob_flag(k, flag, sizeof flag);
            describe_default(&defaults, k, def, sizeof def);
            fprintf(out, "| `%s` / `", k->key);
            for (const char *c = flag; *c; c++) /* a table cell ends at a bare '|' */
                fprintf(out, *c == '|' ? "\\|" : "%c", *c);
            fprintf(out, "` | `%s` | %s |\n", def, k->help);
            if (strcmp(k->key, "enable_prefix_cache") == 0)
                fprintf(out, "| | `--no-prefix-cache` | | turn the prefix cache off |\n");
        }
        return 0;
    }
    return KVD_EINVAL;
}

void kvd_config_model_name(const kvd_server_config *cfg, char *out, size_t cap)
{
    if (cfg->served_model_name[0]) {
        snprintf(out, cap, "%.*s", (int)strcspn(cfg->served_model_name, ","), cfg->served_model_name);
        return;
    }
    size_t len = strlen(cfg->model);
    while (len > 1 && cfg->model[len - 1] == '/')
        len--;
    size_t start = len;
    while (start > 0 && cfg->model[start - 1] != '/')
        start--;
    snprintf(out, cap, "%.*s", (int)(len - start), cfg->model + start);
}
