/* bench_engine.c - continuous batching throughput and latency through the engine API.
 *
 * For each concurrency level c, c requests (random plain-token prompts of --prompt
 * tokens, --gen generated tokens with ignore_eos, greedy) are submitted at once to an
 * engine running on its own thread; the main thread consumes events as the server
 * would (wait_events + poll) and stamps each token on arrival. Reported: aggregate
 * output tokens/s over the level's wall time, time to first token and time per
 * output token (per request: (last - first) / (tokens - 1)) percentiles, and from the
 * engine's step counters the share of step time outside the forward pass (scheduling;
 * sampling, detokenisation and events). A second part times the sampler alone on a
 * 151936-wide row for common parameter sets.
 *
 * Usage: bench_engine [--model DIR] [--threads N] [--prompt N] [--gen N]
 *                     [--conc 1,4,16,64] [--sampler-only]
 * The model defaults to models/bench-0.5b (kvd-mkmodel --preset qwen2.5-0.5b).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvd/kvd_engine.h"

#define MAX_LEVELS 8

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted v[0..n). */
static double pct(const double *v, int n, double p)
{
    int k = (int)(p / 100.0 * n + 0.999999) - 1;
    k = k < 0 ? 0 : k >= n ? n - 1 : k;
    return v[k];
}

typedef struct req_timing {
    int64_t id;
    double submitted, first, last;
    int tokens;
    bool done;
} req_timing;

static void sampler_bench(int vocab)
{
    kvd_sampler *s = kvd_sampler_create(vocab, vocab);
    float *base = malloc((size_t)vocab * sizeof *base), *row = malloc((size_t)vocab * sizeof *row);
    int32_t history[640];
    kvd_rng g;
    kvd_rng_seed(&g, 1);
    /* A peaked row like a trained model's: a few plausible tokens over a long low tail. */
    for (int i = 0; i < vocab; i++) {
        double u = kvd_rng_uniform(&g);
        base[i] = (float)(u < 0.001 ? 8.0 + 6.0 * kvd_rng_uniform(&g) : 6.0 * u - 3.0);
    }
    for (int i = 0; i < 640; i++)
        history[i] = (int32_t)(kvd_rng_uniform(&g) * vocab);
    typedef struct sampler_case {
        const char *name;
        kvd_sampling_params p;
    } sampler_case;
    sampler_case cases[8];
    int nc = 0;
    kvd_sampling_params p = kvd_sampling_params_default();
    cases[nc++] = (sampler_case){"greedy", p};
    p.temperature = 0.7f;
    p.top_p = 0.8f;
    p.top_k = 20;
    p.repetition_penalty = 1.1f;
    cases[nc++] = (sampler_case){"Qwen defaults (T 0.7, top_k 20, top_p 0.8, rep 1.1)", p};
    p = kvd_sampling_params_default();
    p.temperature = 1.0f;
    cases[nc++] = (sampler_case){"temperature 1 only", p};
    p.top_p = 0.95f;
    cases[nc++] = (sampler_case){"top_p 0.95 alone", p};
    p = kvd_sampling_params_default();
    p.temperature = 1.0f;
    p.min_p = 0.05f;
    cases[nc++] = (sampler_case){"min_p 0.05 alone", p};
    p = kvd_sampling_params_default();
    p.temperature = 1.0f;
    p.top_k = 4096;
    cases[nc++] = (sampler_case){"top_k 4096", p};
    p = kvd_sampling_params_default();
    p.logprobs = 5;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.5f;
    cases[nc++] = (sampler_case){"greedy + logprobs 5 + presence/frequency", p};
    printf("\nsampler, vocab %d, 512 prompt + 128 output tokens of history:\n", vocab);
    printf("| parameters | mean us/sample | max us/sample |\n|---|---|---|\n");
    for (int c = 0; c < nc; c++) {
        kvd_rng rng;
        kvd_rng_seed(&rng, 7);
        double total = 0.0, worst = 0.0;
        const int reps = 300;
        for (int r = 0; r < reps; r++) {
            memcpy(row, base, (size_t)vocab * sizeof *row);
            kvd_sample_result res;
            double t0 = now_s();
            kvd_sampler_sample(s, &cases[c].p, row, history, 512, history + 512, 128, &rng, &res);
            double dt = now_s() - t0;
            total += dt;
            worst = dt > worst ? dt : worst;
        }
        printf("| %s | %.1f | %.1f |\n", cases[c].name, total / reps * 1e6, worst * 1e6);
    }
    free(base);
    free(row);
    kvd_sampler_destroy(s);
}

int main(int argc, char **argv)
{
    const char *model_dir = "models/bench-0.5b";
    int threads = 2, prompt_len = 128, gen = 128;
    int levels[MAX_LEVELS] = {1, 4, 16, 64}, num_levels = 4;
    bool sampler_only = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) {
            model_dir = argv[++i];
        } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            threads = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--prompt") && i + 1 < argc) {
            prompt_len = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--gen") && i + 1 < argc) {
            gen = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--conc") && i + 1 < argc) {
            num_levels = 0;
            for (char *tok = strtok(argv[++i], ","); tok && num_levels < MAX_LEVELS; tok = strtok(NULL, ","))
                levels[num_levels++] = atoi(tok);
        } else if (!strcmp(argv[i], "--sampler-only")) {
            sampler_only = true;
        } else {
            fprintf(stderr, "usage: bench_engine [--model DIR] [--threads N] [--prompt N] [--gen N] "
                            "[--conc 1,4,16,64] [--sampler-only]\n");
            return 2;
        }
    }
    if (sampler_only) {
        sampler_bench(151936);
        return 0;
    }

    kvd_error err = {0};
    double t_load = now_s();
    kvd_model *model = kvd_model_load(model_dir, NULL, &err);
    if (!model) {
        fprintf(stderr, "bench_engine: %s\n(generate it: kvd-mkmodel --preset qwen2.5-0.5b --out %s "
                        "--tokenizer third_party/qwen-tokenizer/tokenizer.json)\n",
                err.msg, model_dir);
        return 1;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    kvd_tokenizer *tok = kvd_tokenizer_load(path, &err);
    if (!tok) {
        fprintf(stderr, "bench_engine: %s\n", err.msg);
        return 1;
    }
    printf("model %s: %d layers, hidden %d, vocab %d, %.0f MB of weights (loaded in %.1f s)\n", model_dir,
           model->config.num_layers, model->config.hidden_size, model->config.vocab_size,
           (double)model->weight_bytes / 1e6, now_s() - t_load);
    printf("prompt %d tokens, %d generated (ignore_eos, greedy), %d compute threads\n\n", prompt_len, gen, threads);
    printf("| concurrent | output tok/s | vs 1 seq | TTFT p50 / p90 / max (ms) | TPOT p50 / p90 / max (ms) "
           "| steps | step ms | sched %% | sample+events %% | forward %% |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|\n");

    double single_rate = 0.0;
    for (int L = 0; L < num_levels; L++) {
        const int c = levels[L];
        kvd_engine_config cfg = kvd_engine_config_default();
        cfg.num_threads = threads;
        cfg.max_num_seqs = 64;
        cfg.max_batched_tokens = 512;
        cfg.kv_cache_bytes = (size_t)512 << 20;
        kvd_engine *e = kvd_engine_create(model, tok, &cfg, NULL, NULL, &err);
        if (!e || kvd_engine_start(e, &err) < 0) {
            fprintf(stderr, "bench_engine: %s\n", err.msg);
            return 1;
        }
        req_timing *rt = calloc((size_t)c, sizeof *rt);
        int32_t *prompt = malloc((size_t)prompt_len * sizeof *prompt);
        kvd_rng g;
        kvd_rng_seed(&g, 1000 + (uint64_t)c);
        kvd_request_params params = kvd_request_params_default(NULL);
        params.max_tokens = gen;
        params.ignore_eos = true;
        kvd_engine_stats before;
        kvd_engine_stats_get(e, &before);
        const double start = now_s();
        for (int r = 0; r < c; r++) {
            for (int i = 0; i < prompt_len; i++)
                prompt[i] = (int32_t)(kvd_rng_uniform(&g) * 151643);
            rt[r].submitted = now_s();
            rt[r].id = kvd_engine_submit(e, prompt, prompt_len, &params, &err);
            if (rt[r].id <= 0) {
                fprintf(stderr, "bench_engine: submit: %s\n", err.msg);
                return 1;
            }
        }
        int done = 0;
        while (done < c) {
            kvd_engine_wait_events(e, 100);
            kvd_event *list = kvd_engine_poll_events(e);
            const double t = now_s();
            for (kvd_event *ev = list; ev; ev = ev->next) {
                req_timing *q = &rt[ev->request_id - (uint64_t)rt[0].id];
                if (ev->num_tokens > 0) {
                    if (q->tokens == 0)
                        q->first = t;
                    q->last = t;
                    q->tokens += ev->num_tokens;
                }
                if (ev->finish != KVD_FINISH_NONE) {
                    q->done = true;
                    done++;
                }
            }
            kvd_event_free(list);
        }
        const double wall = now_s() - start;
        kvd_engine_stats st;
        kvd_engine_stats_get(e, &st);
        kvd_engine_destroy(e);

        double *ttft = malloc((size_t)c * sizeof *ttft), *tpot = malloc((size_t)c * sizeof *tpot);
        long total_tokens = 0;
        for (int r = 0; r < c; r++) {
            ttft[r] = (rt[r].first - rt[r].submitted) * 1e3;
            tpot[r] = rt[r].tokens > 1 ? (rt[r].last - rt[r].first) * 1e3 / (rt[r].tokens - 1) : 0.0;
            total_tokens += rt[r].tokens;
        }
        qsort(ttft, (size_t)c, sizeof *ttft, cmp_double);
        qsort(tpot, (size_t)c, sizeof *tpot, cmp_double);
        const double rate = (double)total_tokens / wall;
        if (c == 1 || single_rate == 0.0)
            single_rate = c == 1 ? rate : single_rate;
        const double step_ns = (double)(st.step_ns - before.step_ns);
        const uint64_t steps = st.steps - before.steps;
        printf("| %d | %.1f | %.2fx | %.0f / %.0f / %.0f | %.1f / %.1f / %.1f | %llu | %.1f | %.3f | %.3f | %.2f |\n",
               c, rate, single_rate > 0 ? rate / single_rate : 0.0, pct(ttft, c, 50), pct(ttft, c, 90), ttft[c - 1],
               pct(tpot, c, 50), pct(tpot, c, 90), tpot[c - 1], (unsigned long long)steps,
               steps ? step_ns / (double)steps / 1e6 : 0.0,
               100.0 * (double)(st.schedule_ns - before.schedule_ns) / step_ns,
               100.0 * (double)(st.sample_ns - before.sample_ns) / step_ns,
               100.0 * (double)(st.forward_ns - before.forward_ns) / step_ns);
        fflush(stdout);
        free(ttft);
        free(tpot);
        free(rt);
        free(prompt);
    }
    sampler_bench(model->config.vocab_size);
    kvd_tokenizer_destroy(tok);
    kvd_model_destroy(model);
    return 0;
}
