/* fuzz_config.c - libFuzzer target: the config.json parser on arbitrary bytes.
 *
 * An accepted config must satisfy the shape relations the forward pass assumes
 * (head_dim * heads == hidden, KV heads divide query heads, even head_dim, positive
 * sizes, eos ids inside the vocabulary); a refusal must leave the output untouched.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvd/kvd_model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kvd_model_config cfg, before;
    memset(&cfg, 0x5a, sizeof cfg);
    before = cfg;
    kvd_error err = {0};
    int rc = kvd_model_config_parse((const char *)data, size, "fuzz/config.json", &cfg, &err);
    if (rc != 0) {
        if (err.code != rc || err.msg[0] == '\0' || strchr(err.msg, '\n') ||
            memcmp(&cfg, &before, sizeof cfg) != 0)
            abort();
        return 0;
    }
    if (cfg.vocab_size <= 0 || cfg.hidden_size <= 0 || cfg.intermediate_size <= 0 ||
        cfg.num_layers <= 0 || cfg.num_heads <= 0 || cfg.num_kv_heads <= 0 ||
        cfg.max_position_embeddings <= 0 || !(cfg.rms_norm_eps > 0) || !(cfg.rope_theta > 0))
        abort();
    if (cfg.head_dim * cfg.num_heads != cfg.hidden_size || cfg.head_dim % 2 != 0 ||
        cfg.num_heads % cfg.num_kv_heads != 0)
        abort();
    if (cfg.bos_token_id < -1 || cfg.bos_token_id >= cfg.vocab_size ||
        cfg.num_eos_token_ids < 0 || cfg.num_eos_token_ids > KVD_MAX_EOS_IDS)
        abort();
    for (int i = 0; i < cfg.num_eos_token_ids; i++)
        if (cfg.eos_token_ids[i] < 0 || cfg.eos_token_ids[i] >= cfg.vocab_size)
            abort();
    return 0;
}
