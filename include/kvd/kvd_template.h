/* kvd_template.h - a sandboxed engine for the Jinja subset that chat templates use.
 *
 * A model's chat template (tokenizer_config.json's chat_template, a GGUF's
 * tokenizer.chat_template, or a file) is parsed once when the model loads: anything the
 * engine does not support (an unknown filter or test, a tag it does not know) is an
 * error naming the template line then, never on the first request. Rendering follows
 * Jinja2 as Hugging Face's apply_chat_template configures it: trim_blocks, lstrip_blocks,
 * the loopcontrols extension (break/continue), tojson as json.dumps(ensure_ascii=False,
 * indent, separators, sort_keys), the globals raise_exception(msg) and strftime_now(fmt),
 * and Jinja's default Undefined (missing attributes are falsy, printing them prints
 * nothing, using them in arithmetic is an error).
 *
 * Sandbox: a template reads only the variables it is given; there is no file,
 * environment or import access, and every render is bounded in loop iterations and
 * macro calls (steps), output bytes, nesting depth and memory: a template that exceeds
 * a bound fails with an error, it never hangs or exhausts the process.
 *
 * Provenance: every output byte is known to come either from the template's own text
 * (literals) or from the variables (a message's content, a tool's JSON). The output
 * lists the variable-derived byte ranges, so the caller can match special tokens only in
 * the template's own text and a user can never forge a turn by typing "<|im_start|>".
 * Strings transformed by a method or filter (strip, split, replace, ...) count as
 * variable-derived when any input byte was.
 *
 * Threading: a parsed kvd_template is immutable; any number of threads may render it
 * at once (each render allocates its own memory). The caller frees the template with
 * kvd_template_destroy and each output with kvd_template_output_free.
 */
#ifndef KVD_TEMPLATE_H
#define KVD_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "kvd/kvd_error.h"

typedef struct kvd_template kvd_template;

typedef struct kvd_template_limits {
    uint64_t max_steps;       /* loop iterations + macro calls + list items built */
    size_t max_output;        /* bytes of rendered text */
    int max_depth;            /* macro call nesting */
    size_t max_memory;        /* bytes the render may allocate */
} kvd_template_limits;

/* Limits generous for any real chat template (1M steps, 16 MiB output, depth 64,
 * 256 MiB memory). */
kvd_template_limits kvd_template_default_limits(void);

/* Parses source (len bytes; need not be NUL-terminated). Returns NULL with err set
 * ("chat template line 12: unknown filter 'foo'") on a syntax error or an unsupported
 * construct. name (e.g. "tokenizer_config.json") prefixes the message; may be NULL. */
kvd_template *kvd_template_parse(const char *source, size_t len, const char *name, kvd_error *err);
void kvd_template_destroy(kvd_template *t);

/* A byte range of the output that came from the variables, not the template text. */
typedef struct kvd_template_span {
    size_t offset;
    size_t len;
} kvd_template_span;

typedef struct kvd_template_output {
    char *text;                  /* NUL-terminated (the output may contain other NULs) */
    size_t len;
    kvd_template_span *data_spans; /* variable-derived ranges, in order, disjoint */
    size_t num_data_spans;
} kvd_template_output;

/* Renders t with the members of vars (a JSON object: messages, tools,
 * add_generation_prompt, ...) as variables. Strings of trusted (another object, may be
 * NULL: bos_token, eos_token) count as template text for provenance. limits may be
 * NULL (the defaults). Returns 0 and fills out, or a negative code with err set:
 * KVD_EINVAL for a template error at render time (undefined used in arithmetic, a type
 * error, raise_exception: "chat template line 3: ..."), KVD_ETOOLONG for an exceeded
 * bound, KVD_ENOMEM. On failure out is left zeroed. */
int kvd_template_render(const kvd_template *t, const cJSON *vars, const cJSON *trusted,
                        const kvd_template_limits *limits, kvd_template_output *out, kvd_error *err);

void kvd_template_output_free(kvd_template_output *out);

#endif
