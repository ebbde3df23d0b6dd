/* gguf_model.h - a qwen2 GGUF's hyper-parameters and tensor names (loader-private).
 *
 * Used by loader.c only: the GGUF file format itself is kvd_gguf.h.
 */
#ifndef KVD_GGUF_MODEL_H
#define KVD_GGUF_MODEL_H

#include "kvd/kvd_gguf.h"
#include "kvd/kvd_model.h"

/* Fills cfg from the qwen2.* keys (architecture qwen2 only), the vocabulary size from
 * token_embd.weight's rows, tied embeddings from output.weight's absence, and the BOS/EOS
 * ids from tokenizer.ggml.*; *chat_template becomes a malloc'ed copy of
 * tokenizer.chat_template or NULL. Returns 0, KVD_EFORMAT, KVD_EUNSUPPORTED or KVD_ENOMEM
 * with err set (a missing or out-of-range key, the wrong architecture); cfg and
 * *chat_template are untouched on failure. */
int kvd_gguf_model_config(const kvd_gguf *g, const char *path, kvd_model_config *cfg,
                          char **chat_template, kvd_error *err);

#endif
