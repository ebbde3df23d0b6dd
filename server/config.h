/* config.h - the daemon's configuration: every knob, its default, file and flags.
 *
 * One table describes each knob once (JSON key, flag, type, range, help text), so
 * the config file (configs/NAME.json), the command line and `kvd --help` cannot drift
 * apart. Precedence: built-in defaults < config file < command-line flags. Unknown
 * keys, wrong types and out-of-range values are refused with a message naming the
 * key or flag; main turns that into exit status 2.
 */
#ifndef KVD_SERVER_CONFIG_H
#define KVD_SERVER_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_model.h"
#include "util.h"

#define KVD_CONFIG_PATH_MAX 4096

typedef struct kvd_server_config {
    char host[256];
    int port;                        /* 0 = any free port */
    char model[KVD_CONFIG_PATH_MAX]; /* checkpoint directory (config.json, safetensors, tokenizer.json) */
    char served_model_name[256];     /* "name[,alias...]"; "" = the model directory's last component */
    char chat_template[KVD_CONFIG_PATH_MAX]; /* a Jinja file over the model's own template; "" = the model's */
    int block_size;
    uint64_t kv_cache_bytes;
    uint64_t kv_num_blocks;          /* non-zero: exact pool size, overrides kv_cache_bytes */
    kvd_dtype kv_dtype;
    char kv_disk[KVD_CONFIG_PATH_MAX]; /* "" = no disk tier */
    int kv_disk_gb;                  /* the disk tier's size cap, GiB */
    char quantize[16];               /* "" or a kvd-quantize type: matrices converted at load */
    int max_num_seqs;
    int max_batched_tokens;
    int prefill_pack_tokens;
    int max_queue;
    uint64_t max_body_bytes;
    uint64_t max_header_bytes;
    uint64_t header_timeout_ms;
    uint64_t idle_timeout_ms;
    uint64_t body_timeout_ms;
    int max_connections;
    uint64_t max_write_queue_bytes;
    uint64_t max_response_bytes;     /* a whole (non-streamed) response held in memory */
    uint64_t socket_send_buffer_bytes; /* 0 = kernel autotuning */
    uint64_t send_timeout_ms;        /* 0 = none */
    uint64_t max_buffered_body_bytes;
    char allowed_hosts[1024];        /* "" = loopback names on a loopback bind, else any */
    char allowed_origins[2048];      /* "" = none but the daemon's own pages */
    int drain_timeout_s;
    char api_key[512];               /* "" = no authentication */
    int threads;                     /* compute threads, 0 = all cores */
    bool enable_prefix_cache;
    kvd_log_level log_level;
    char config_path[KVD_CONFIG_PATH_MAX]; /* the file loaded, "" if none */
} kvd_server_config;

void kvd_config_defaults(kvd_server_config *cfg);

/* Applies the keys of a JSON object text over cfg. path names the source in
 * messages. Returns 0, or KVD_EFORMAT / KVD_EINVAL with err naming path and key;
 * cfg is unchanged on failure. */
int kvd_config_apply_json(kvd_server_config *cfg, const char *text, size_t len, const char *path,
                          kvd_error *err);
/* Reads path and applies it (KVD_EIO when unreadable). */
int kvd_config_load_file(kvd_server_config *cfg, const char *path, kvd_error *err);

/* Fills cfg from defaults, the --config file if given, then the other flags.
 * Sets *show_help for --help/-h (nothing else is checked then). Returns 0 or a
 * negative code with err naming the flag or key. Does not validate cross-field
 * constraints: call kvd_config_validate. */
int kvd_config_from_args(kvd_server_config *cfg, int argc, char **argv, bool *show_help,
                         kvd_error *err);

/* Checks what a single key cannot: model set and a directory, block_size a power of
 * two, and so on. Returns 0 or KVD_EINVAL naming the key. */
int kvd_config_validate(const kvd_server_config *cfg, kvd_error *err);

/* `kvd --help`: usage and every flag with its default. */
void kvd_config_print_help(FILE *out, const char *prog);

/* Every knob with its default: "json" as a config file (configs/default.json),
 * "md" as the table in docs/operations.md. Returns 0, or KVD_EINVAL for another
 * format. The knob table in config.c is the one place a knob is described: a new knob
 * is a field above, one row there (and its default in kvd_config_defaults unless 0);
 * --help, files and flags follow, and scripts/knobs.sh rewrites the two listings. */
int kvd_config_print_knobs(FILE *out, const char *format);

/* The served model name: served_model_name's first name or the model directory's
 * last component. */
void kvd_config_model_name(const kvd_server_config *cfg, char *out, size_t cap);

#endif
