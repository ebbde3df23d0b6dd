/* bench_grammar_engine.c - what structured output costs the engine per step.
 *
 * 16 requests (random plain-token prompts, temperature 1, max_tokens --gen) run at once
 * through the engine driven by kvd_engine_step, twice: without a constraint and with
 * a JSON Schema (an object with an enum, a bounded integer and an array of strings:
 * outputs stay inside it for the whole run unless the model closes it), three rounds
 * each, interleaved. Reported per round: steps, tokens, mean step time and the
 * sampling share (the masks are computed there). The constrained choices finish when
 * their object closes, so their steps run fewer sequences and mean step times do not
 * compare; the last line does: the forward pass is the same with or without a
 * grammar, so the grammar's cost per token is the difference of the sampling time per
 * token (mask, masking and matcher update all happen there), and its cost per step at
 * --conc sequences is that times --conc over the plain mean step time.
 *
 * Usage: bench_grammar_engine [--model DIR] [--gen N] [--conc N]
 * The model defaults to $KVD_TINY_MODEL (the test fixture).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd/kvd_engine.h"
#include "kvd/kvd_grammar.h"

static const char schema[] =
    "{\"type\": \"object\", \"properties\": {\"kind\": {\"enum\": [\"alpha\", \"beta\"]}, \"n\": {\"type\": "
    "\"integer\", \"minimum\": 0, \"maximum\": 1000}, \"words\": {\"type\": \"array\", \"items\": {\"type\": "
    "\"string\"}}}, \"required\": [\"kind\", \"n\", \"words\"], \"additionalProperties\": false}";

typedef struct totals {
    double step_ns, sample_ns, steps, tokens;
} totals;

static void run(kvd_engine *e, kvd_grammar *g, int conc, int gen, uint64_t seed, const char *label, totals *sum)
{
    kvd_request_params p = kvd_request_params_default(NULL);
    p.sampling.temperature = 1.0f;
    p.max_tokens = gen;
    p.grammar = g;
    kvd_engine_stats before, after;
    kvd_engine_stats_get(e, &before);
    kvd_error err = {0};
    for (int i = 0; i < conc; i++) {
        int32_t prompt[32];
        kvd_rng r;
        kvd_rng_seed(&r, seed * 100 + (uint64_t)i);
        for (int k = 0; k < 32; k++) prompt[k] = (int32_t)(kvd_rng_uniform(&r) * 151643);
        p.sampling.seed = seed * 100 + (uint64_t)i;
        if (kvd_engine_submit(e, prompt, 32, &p, &err) <= 0) {
            fprintf(stderr, "submit: %s\n", err.msg);
            exit(1);
        }
    }
    while (kvd_engine_busy(e)) {
        if (kvd_engine_step(e, &err) < 0) {
            fprintf(stderr, "step: %s\n", err.msg);
            exit(1);
        }
        kvd_event_free(kvd_engine_poll_events(e));
    }
    kvd_engine_stats_get(e, &after);
    uint64_t steps = after.steps - before.steps, toks = after.generation_tokens_total - before.generation_tokens_total;
    double step_ns = (double)(after.step_ns - before.step_ns), sample_ns = (double)(after.sample_ns - before.sample_ns);
    printf("%-12s %5llu steps %6llu tokens  %.3f ms/step  %.3f ms/token  sampling %.1f%% of step time\n", label,
           (unsigned long long)steps, (unsigned long long)toks, step_ns / (double)steps / 1e6,
           step_ns / (double)toks / 1e6, 100.0 * sample_ns / step_ns);
    if (sum) {
        sum->step_ns += step_ns;
        sum->sample_ns += sample_ns;
        sum->steps += (double)steps;
        sum->tokens += (double)toks;
    }
}

int main(int argc, char **argv)
{
    const char *dir = getenv("KVD_TINY_MODEL");
    int gen = 128, conc = 16;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) dir = argv[i + 1];
        else if (!strcmp(argv[i], "--gen")) gen = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--conc")) conc = atoi(argv[i + 1]);
    }
    if (!dir) {
        fprintf(stderr, "usage: bench_grammar_engine --model DIR [--gen N] [--conc N]\n");
        return 2;
    }
    kvd_error err = {0};
    kvd_model *model = kvd_model_load(dir, NULL, &err);
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    kvd_tokenizer *tok = model ? kvd_tokenizer_load(path, &err) : NULL;
    kvd_grammar_vocab *voc = tok ? kvd_grammar_vocab_create(tok, model->config.vocab_size, &err) : NULL;
    kvd_grammar *g = voc ? kvd_grammar_compile_json_schema(voc, schema, sizeof schema - 1, NULL, &err) : NULL;
    if (!g) {
        fprintf(stderr, "bench_grammar_engine: %s\n", err.msg);
        return 1;
    }
    kvd_engine_config cfg = kvd_engine_config_default();
    cfg.num_threads = 1;
    cfg.max_num_seqs = conc;
    kvd_engine *e = kvd_engine_create(model, tok, &cfg, NULL, NULL, &err);
    if (!e) {
        fprintf(stderr, "engine: %s\n", err.msg);
        return 1;
    }
    printf("%d concurrent requests, up to %d tokens each, one compute thread\n", conc, gen);
    run(e, g, conc, 8, 99, "warm-up", NULL); /* the mask cache's first walks are not the steady state */
    totals plain = {0}, constrained = {0};
    for (int round = 0; round < 3; round++) {
        run(e, NULL, conc, gen, (uint64_t)round + 1, "plain", &plain);
        run(e, g, conc, gen, (uint64_t)round + 1, "json schema", &constrained);
    }
    const double plain_tok_us = plain.sample_ns / plain.tokens / 1e3;
    const double schema_tok_us = constrained.sample_ns / constrained.tokens / 1e3;
    const double plain_step_us = plain.step_ns / plain.steps / 1e3;
    printf("grammar cost per step at %d sequences: %.1f%% (sampling per token: plain %.1f us, json schema %.1f us; "
           "plain step %.3f ms)\n",
           conc, 100.0 * (schema_tok_us - plain_tok_us) * conc / plain_step_us, plain_tok_us, schema_tok_us,
           plain_step_us / 1e3);
    kvd_engine_destroy(e);
    kvd_grammar_release(g);
    kvd_grammar_vocab_destroy(voc);
    kvd_tokenizer_destroy(tok);
    kvd_model_destroy(model);
    return 0;
}
