/* chat.h - the Qwen2.5 ChatML chat template: messages -> prompt text -> token ids.
 *
 * Rendering follows Qwen2.5-Instruct's tokenizer_config.json template without tools:
 * "<|im_start|>{role}\n{content}<|im_end|>\n" per message, the default system turn
 * first when the conversation does not open with one, tool results grouped into a
 * user turn inside <tool_response> tags, then the generation prompt
 * "<|im_start|>assistant\n". The renderer remembers where it placed the special
 * tokens, and encoding maps only those to special ids: special-token text typed by a
 * user inside a message stays plain text, so a message cannot forge a turn.
 */
#ifndef KVD_SERVER_CHAT_H
#define KVD_SERVER_CHAT_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "kvd/kvd_error.h"
#include "kvd/kvd_tokenizer.h"
#include "util.h"

#define KVD_CHAT_DEFAULT_SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

enum kvd_chat_marker { KVD_CHAT_IM_START, KVD_CHAT_IM_END };

typedef struct kvd_chat_special {
    size_t offset;             /* in text */
    enum kvd_chat_marker marker;
} kvd_chat_special;

typedef struct kvd_chat_prompt {
    kvd_sbuf text;             /* the rendered conversation */
    kvd_chat_special *specials; /* template-placed special tokens, in text order */
    int num_specials;
    int cap_specials;
} kvd_chat_prompt;

void kvd_chat_prompt_init(kvd_chat_prompt *p);
void kvd_chat_prompt_deinit(kvd_chat_prompt *p);

/* Renders an OpenAI "messages" array into p (which must be freshly initialised).
 * Returns 0, or KVD_EINVAL with err set and param (cap bytes) naming the offending
 * field ("messages[1].content"); KVD_ENOMEM. */
int kvd_chat_render(const cJSON *messages, kvd_chat_prompt *p, char *param, size_t param_cap,
                    kvd_error *err);

/* Takes the generation prompt ("<|im_start|>assistant\n") off a rendered prompt, for
 * /tokenize's "add_generation_prompt": false. */
void kvd_chat_drop_generation_prompt(kvd_chat_prompt *p);

/* Token ids of a rendered prompt: plain spans encoded without special-token
 * matching, template markers as <|im_start|>/<|im_end|>. Returns the count and a
 * malloc'ed array in *ids, or a negative code with err set. */
int kvd_chat_encode(const kvd_chat_prompt *p, const kvd_tokenizer *tok, int32_t **ids, kvd_error *err);

#endif
