/* bench_model.c - prefill and decode speed of the forward pass, the KV-cache experiment,
 * and the machine's memory bandwidth that bounds decoding.
 *
 * On a checkpoint (the qwen2.5-0.5b preset of kvd-mkmodel for the documented figures):
 * - memory bandwidth: streaming reads of 1 GiB with the bench's threads (best over a few
 *   access patterns, see memory_bandwidth); the decode bound is bandwidth / bytes of
 *   weights one decode step reads.
 * - prefill: one forward step over a P-token prompt (default 512), best of 3.
 * - decode: tokens/s of greedy decoding of one sequence after a short prompt.
 * - with --batch N (N > 1): N sequences decoding together, one forward per step.
 * - the tutorial's experiment: wall time to generate N tokens (32, 128, 512) after an
 *   8-token prompt, with the paged KV cache and without any cache (every step
 *   recomputes the whole sequence), and the speedup; --plot-data writes the table
 *   for bench/plot_kv_speedup.gp.
 * Greedy ids of the two modes are compared: they must be identical.
 *
 * Usage: bench_model [--model DIR] [--threads N] [--prompt-tokens P] [--decode-tokens D]
 *                    [--batch N] [--experiment 32,128,512 | --experiment none]
 *                    [--kv-dtype f16|bf16|f32] [--plot-data FILE]
 *                    [--fused-tokens N,N,...]
 * --fused-tokens runs the batched decode once per value (kvd_forward_set_fused_tokens),
 * in the order given: old and new phase structure side by side in one process.
 */
#include <omp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "kvd/kvd_forward.h"
#include "kvd/kvd_kernels.h"
#include "kvd/kvd_kv.h"
#include "kvd/kvd_model.h"

#define MAX_EXPERIMENTS 8
#define PROMPT_FOR_EXPERIMENT 8

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* CPU seconds (user + system) this process has used: compared with wall time it shows
 * how much of the machine the bench actually got (it is shared while we measure). */
static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

/* 64 bytes as one value: XORs of it compile to the widest vector loads the build allows. */
typedef uint64_t line64 __attribute__((vector_size(64), aligned(64)));
/* GB/s of one streaming read of `lines` lines of buf: each thread reads its share as
 * `streams` interleaved sequential streams of whole lines, prefetching `prefetch`
 * lines ahead (0: the hardware prefetcher alone). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* whole-line loads where the CPU has them, as the kernels use (SSE loads read ~30% less) */
__attribute__((target_clones("avx512f", "default")))
#endif
static double read_pass(const line64 *buf, size_t lines, int threads, int streams, int prefetch)
{
    enum { MAX_STREAMS = 8 };
    double t0 = now_seconds();
    uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
    {
        size_t per = lines / (size_t)omp_get_num_threads();
        size_t begin = per * (size_t)omp_get_thread_num(), stream_len = per / (size_t)streams;
        line64 acc[MAX_STREAMS] = {{0}};
        for (size_t i = 0; i < stream_len; i++) {
            for (int s = 0; s < streams; s++) {
                const line64 *p = buf + begin + (size_t)s * stream_len + i;
                if (prefetch)
                    __builtin_prefetch(p + prefetch);
                acc[s] ^= *p;
            }
        }
        for (int s = 0; s < streams; s++)
            for (int j = 0; j < 8; j++)
                total ^= acc[s][j];
    }
    double dt = now_seconds() - t0;
    volatile uint64_t sink = total; /* keeps the reads */
    (void)sink;
    return (double)lines * sizeof(line64) / dt / 1e9;
}

/* Best GB/s of streaming reads over a 1 GiB buffer with `threads` threads, over the
 * access patterns that get the most out of this kind of CPU (measured: one stream per
 * thread reaches ~32 GB/s, 2-4 streams with a 1-2 KiB prefetch distance 55-70 GB/s,
 * 8 streams less again); 3 passes of each. A decode step is the same kind of read,
 * so its bound is taken against the best. */
static double memory_bandwidth(int threads)
{
    size_t bytes = (size_t)1 << 30, lines = bytes / sizeof(line64);
    line64 *buf = aligned_alloc(64, bytes);
    if (!buf)
        return 0;
    for (size_t i = 0; i < lines * 8; i++)
        ((uint64_t *)buf)[i] = i;
    static const int streams[] = {2, 4}, prefetch[] = {0, 16, 32};
    double best = 0;
    for (int rep = 0; rep < 3; rep++)
        for (size_t s = 0; s < sizeof streams / sizeof streams[0]; s++)
            for (size_t p = 0; p < sizeof prefetch / sizeof prefetch[0]; p++) {
                double gbs = read_pass(buf, lines, threads, streams[s], prefetch[p]);
                best = gbs > best ? gbs : best;
            }
    free(buf);
    return best;
}

/* A "Vm..:" line of /proc/self/status in bytes, or 0 where there is none. */
static double status_bytes(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    size_t len = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, len) == 0 && line[len] == ':')
            kb = strtod(line + len + 1, NULL);
    if (f)
        fclose(f);
    return kb * 1024;
}

/* Deterministic pseudo-random ordinary token ids (below the special tokens). */
static void make_prompt(int32_t *ids, int n, uint64_t seed)
{
    for (int i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int32_t)((seed >> 33) % 151000);
    }
}

typedef struct bench {
    kvd_model *model;
    kvd_kv_pool *pool;
    kvd_forward_ctx *ctx;
    float *logits;
    int vocab;
} bench;

static int forward_step(bench *b, kvd_block_table *table, const int32_t *ids, int num_past, int n)
{
    kvd_error err = {0};
    int need = num_past + n - table->num_tokens;
    if (need > 0 && kvd_block_table_append(b->pool, table, need, &err) != 0) {
        fprintf(stderr, "bench_model: %s\n", err.msg);
        return -1;
    }
    kvd_forward_seq seq = {table, num_past, n, 0, KVD_LOGITS_LAST};
    kvd_forward_batch batch = {ids + num_past, n, &seq, 1, b->logits};
    if (kvd_forward(b->ctx, &batch, &err) != 0) {
        fprintf(stderr, "bench_model: %s\n", err.msg);
        return -1;
    }
    return 0;
}

/* Generates `steps` greedy tokens after ids[0..n) (ids must hold n + steps); returns
 * seconds, or -1. With cache, one prefill then one token per step; without, every
 * step recomputes positions [0, current length) through a scratch table. */
static double generate(bench *b, int32_t *ids, int n, int steps, bool cache)
{
    kvd_block_table table;
    kvd_block_table_init(&table);
    double t0 = now_seconds();
    for (int k = 0; k < steps; k++) {
        int rc;
        if (!cache) {
            rc = forward_step(b, &table, ids, 0, n + k);
            kvd_block_table_release(b->pool, &table);
        } else {
            rc = k == 0 ? forward_step(b, &table, ids, 0, n) : forward_step(b, &table, ids, n + k - 1, 1);
        }
        if (rc != 0)
            return -1;
        ids[n + k] = kvd_argmax(b->logits, b->vocab);
    }
    double dt = now_seconds() - t0;
    kvd_block_table_deinit(b->pool, &table);
    return dt;
}

typedef struct argmax_rows {
    const float *logits;
    int vocab;
    int32_t *tokens;
} argmax_rows;

static void argmax_row(void *arg, int item, int thread)
{
    (void)thread;
    const argmax_rows *ar = arg;
    ar->tokens[item] = kvd_argmax(ar->logits + (size_t)item * ar->vocab, ar->vocab);
}

/* Decode of `n` sequences together (each after its own 32-token prompt), one token
 * each per step: the forward pass of a continuous batch without the engine around it. */
static int batched_decode(bench *b, int n, int steps, double step_params)
{
    enum { PROMPT = 32 };
    kvd_block_table *tables = calloc((size_t)n, sizeof *tables);
    kvd_forward_seq *seqs = calloc((size_t)n, sizeof *seqs);
    int32_t *ids = malloc((size_t)n * (PROMPT + 1) * sizeof(int32_t));
    int32_t *tokens = malloc((size_t)n * sizeof(int32_t));
    if (!tables || !seqs || !ids || !tokens) {
        fprintf(stderr, "bench_model: out of memory for %d sequences\n", n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        int32_t *own = ids + (size_t)i * (PROMPT + 1);
        kvd_block_table_init(&tables[i]);
        make_prompt(own, PROMPT, 100 + (uint64_t)i);
        if (forward_step(b, &tables[i], own, 0, PROMPT) != 0)
            return -1;
        tokens[i] = kvd_argmax(b->logits, b->vocab);
    }
    kvd_error err = {0};
    double t0 = now_seconds(), c0 = cpu_seconds(), best = 1e30;
    for (int k = 0; k < steps; k++) {
        for (int i = 0; i < n; i++) {
            if (tables[i].num_tokens < PROMPT + k + 1 &&
                kvd_block_table_append(b->pool, &tables[i], PROMPT + k + 1 - tables[i].num_tokens, &err) != 0) {
                fprintf(stderr, "bench_model: %s\n", err.msg);
                return -1;
            }
            seqs[i] = (kvd_forward_seq){&tables[i], PROMPT + k, 1, i, KVD_LOGITS_LAST};
        }
        kvd_forward_batch fb = {tokens, n, seqs, n, b->logits};
        double s0 = now_seconds();
        if (kvd_forward(b->ctx, &fb, &err) != 0) {
            fprintf(stderr, "bench_model: %s\n", err.msg);
            return -1;
        }
        double ds = now_seconds() - s0;
        best = ds < best ? ds : best;
        /* greedy picks across the forward's threads, as the engine samples a step */
        argmax_rows ar = {b->logits, b->vocab, tokens};
        kvd_forward_for_each(b->ctx, n, argmax_row, &ar);
    }
    double dt = now_seconds() - t0, cpu = cpu_seconds() - c0;
    /* 2 flops per weight per row (the lm_head included: every row needs its logits) */
    double flops = 2.0 * step_params * n;
    /* the last step's ids: runs that must compute the same bits print the same hash */
    uint64_t hash = 14695981039346656037u;
    for (int i = 0; i < n; i++)
        hash = (hash ^ (uint32_t)tokens[i]) * 1099511628211u;
    printf("batched decode: %d sequences x %d steps in %.1f ms = %.1f tokens/s (step mean %.2f ms, "
           "best %.2f ms = %.0f GFLOP/s); used %.2f cores; %.1f tokens per CPU-second; ids %016llx\n",
           n, steps, dt * 1e3, n * steps / dt, dt / steps * 1e3, best * 1e3, flops / best / 1e9,
           cpu / dt, n * steps / cpu, (unsigned long long)hash);
    for (int i = 0; i < n; i++)
        kvd_block_table_deinit(b->pool, &tables[i]);
    free(tables);
    free(seqs);
    free(ids);
    free(tokens);
    return 0;
}

/* Bytes of a matrix's weights as stored (a quantized one in whole blocks). */
static double matrix_bytes(const kvd_matrix *m)
{
    return (double)m->rows * (double)kvd_dtype_row_bytes(m->dtype, m->cols);
}

int main(int argc, char **argv)
{
    const char *dir = "models/bench-0.5b";
    const char *plot_data = NULL;
    int threads = 2, prompt_tokens = 512, decode_tokens = 128, batch = 1;
    int experiments[MAX_EXPERIMENTS] = {32, 128, 512}, num_experiments = 3;
    kvd_dtype kv_dtype = KVD_DTYPE_F16;
    kvd_model_load_options load_opts = {0};
    enum { MAX_FUSED_RUNS = 16 };
    int fused_runs[MAX_FUSED_RUNS], num_fused_runs = 0;
    for (int i = 1; i < argc; i += 2) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--model") == 0 && v) {
            dir = v;
        } else if (strcmp(a, "--threads") == 0 && v) {
            threads = atoi(v);
        } else if (strcmp(a, "--prompt-tokens") == 0 && v) {
            prompt_tokens = atoi(v);
        } else if (strcmp(a, "--decode-tokens") == 0 && v) {
            decode_tokens = atoi(v);
        } else if (strcmp(a, "--batch") == 0 && v) {
            batch = atoi(v);
        } else if (strcmp(a, "--plot-data") == 0 && v) {
            plot_data = v;
        } else if (strcmp(a, "--quantize") == 0 && v) {
            load_opts.quantize = v;
        } else if (strcmp(a, "--kv-dtype") == 0 && v && kvd_dtype_parse(v, &kv_dtype) == 0) {
        } else if (strcmp(a, "--fused-tokens") == 0 && v) {
            for (char *p = (char *)v; *p && num_fused_runs < MAX_FUSED_RUNS; p += strspn(p, ","))
                fused_runs[num_fused_runs++] = (int)strtol(p, &p, 10);
        } else if (strcmp(a, "--experiment") == 0 && v) {
            num_experiments = 0;
            if (strcmp(v, "none") != 0)
                for (char *p = (char *)v; *p && num_experiments < MAX_EXPERIMENTS; p += strspn(p, ","))
                    experiments[num_experiments++] = (int)strtol(p, &p, 10);
        } else {
            fprintf(stderr, "usage: %s [--model DIR] [--threads N] [--prompt-tokens P] "
                            "[--decode-tokens D] [--batch N] [--experiment N,N,...|none] "
                            "[--kv-dtype f16|bf16|f32] [--plot-data FILE] [--quantize T] "
                            "[--fused-tokens N,N,...]\n", argv[0]);
            return 1;
        }
    }
    if (threads < 1 || prompt_tokens < 1 || decode_tokens < 1 || batch < 1 || batch > 256) {
        fprintf(stderr, "bench_model: --threads, --prompt-tokens and --decode-tokens must be >= 1, "
                        "--batch 1..256\n");
        return 1;
    }
    int max_experiment = 0;
    for (int i = 0; i < num_experiments; i++) {
        if (experiments[i] < 1) {
            fprintf(stderr, "bench_model: --experiment: counts must be >= 1\n");
            return 1;
        }
        max_experiment = experiments[i] > max_experiment ? experiments[i] : max_experiment;
    }

    double bandwidth = memory_bandwidth(threads);
    kvd_error err = {0};
    bench b = {0};
    /* The probe's 1 GiB buffer is freed: reset the peak so it is the load's alone. */
    FILE *clear_refs = fopen("/proc/self/clear_refs", "w");
    if (clear_refs) {
        fputs("5", clear_refs);
        fclose(clear_refs);
    }
    double t_load = now_seconds();
    load_opts.threads = threads;
    b.model = kvd_model_load(dir, &load_opts, &err);
    if (!b.model) {
        fprintf(stderr, "bench_model: %s (generate it: kvd-mkmodel --preset qwen2.5-0.5b --out %s "
                        "--tokenizer third_party/qwen-tokenizer/tokenizer.json)\n", err.msg, dir);
        return 1;
    }
    t_load = now_seconds() - t_load;
    /* peak RSS so far: the loaded weights plus the load's own; then what stays */
    double load_peak = status_bytes("VmHWM"), loaded_rss = status_bytes("VmRSS");
    const kvd_model_config *c = &b.model->config;
    b.vocab = c->vocab_size;
    int longest = prompt_tokens > PROMPT_FOR_EXPERIMENT + max_experiment
                      ? prompt_tokens : PROMPT_FOR_EXPERIMENT + max_experiment;
    longest = longest > 32 + decode_tokens ? longest : 32 + decode_tokens;
    kvd_kv_config kv = {
        .num_layers = c->num_layers, .num_kv_heads = c->num_kv_heads, .head_dim = c->head_dim,
        .block_size = 16, .dtype = kv_dtype,
        .num_blocks = (size_t)(2 * longest / 16 + 8) + (size_t)batch * ((32 + decode_tokens) / 16 + 2),
    };
    b.pool = kvd_kv_pool_create(&kv, &err);
    b.ctx = b.pool ? kvd_forward_create(b.model, b.pool, longest > batch ? longest : batch, batch,
                                        batch, threads, &err)
                   : NULL;
    b.logits = malloc((size_t)batch * (size_t)b.vocab * sizeof(float));
    int32_t *ids = malloc((size_t)(longest + 1) * sizeof(int32_t));
    int32_t *ids2 = malloc((size_t)(longest + 1) * sizeof(int32_t));
    if (!b.ctx || !b.logits || !ids || !ids2) {
        fprintf(stderr, "bench_model: %s\n", err.msg[0] ? err.msg : "out of memory");
        return 1;
    }

    /* Bytes one decode step streams: every layer matrix and the lm_head, plus vectors. */
    double step_bytes = 0, step_params = 0;
    for (int l = 0; l < c->num_layers; l++) {
        const kvd_layer_weights *w = &b.model->layers[l];
        const kvd_matrix *ms[] = {&w->q_proj, &w->k_proj, &w->v_proj, &w->o_proj,
                                  &w->gate_proj, &w->up_proj, &w->down_proj};
        for (int i = 0; i < 7; i++) {
            step_bytes += matrix_bytes(ms[i]);
            step_params += (double)ms[i]->rows * ms[i]->cols;
        }
    }
    step_bytes += matrix_bytes(&b.model->lm_head);
    step_params += (double)b.model->lm_head.rows * b.model->lm_head.cols;
    printf("model %s: %d layers, hidden %d, weights %s (lm_head) / %s (ffn_down 0), %.3f GB read per "
           "decode step; loaded in %.1f s, %.2f GB of weights, peak RSS %.2f GB, RSS after "
           "loading %.2f GB\n",
           dir, c->num_layers, c->hidden_size, kvd_dtype_name(b.model->lm_head.dtype),
           kvd_dtype_name(b.model->layers[0].down_proj.dtype), step_bytes / 1e9, t_load,
           (double)b.model->weight_bytes / 1e9, load_peak / 1e9, loaded_rss / 1e9);
    printf("kernels %s, %d threads, KV %s block 16\n", kvd_isa_name(kvd_isa_detect()), threads,
           kvd_dtype_name(kv_dtype));
    printf("memory bandwidth (streaming read, %d threads): %.1f GB/s -> decode bound %.1f tokens/s\n",
           threads, bandwidth, bandwidth * 1e9 / step_bytes);
    fflush(stdout);

    /* Prefill: best of 3 one-step prefills of a P-token prompt. */
    make_prompt(ids, prompt_tokens, 1);
    double best = 1e30, best_cpu = 0;
    for (int rep = 0; rep < 3; rep++) {
        kvd_block_table table;
        kvd_block_table_init(&table);
        double t0 = now_seconds(), c0 = cpu_seconds();
        if (forward_step(&b, &table, ids, 0, prompt_tokens) != 0)
            return 1;
        double dt = now_seconds() - t0;
        if (dt < best) {
            best = dt;
            best_cpu = cpu_seconds() - c0;
        }
        kvd_block_table_deinit(b.pool, &table);
    }
    printf("prefill: %d tokens in %.1f ms = %.1f tokens/s (used %.2f cores; %.1f tokens per "
           "CPU-second)\n", prompt_tokens, best * 1e3, prompt_tokens / best, best_cpu / best,
           prompt_tokens / best_cpu);
    fflush(stdout);

    /* Decode: one sequence after a 32-token prompt. */
    make_prompt(ids, 32, 2);
    {
        kvd_block_table table;
        kvd_block_table_init(&table);
        if (forward_step(&b, &table, ids, 0, 32) != 0)
            return 1;
        ids[32] = kvd_argmax(b.logits, b.vocab);
        double t0 = now_seconds(), c0 = cpu_seconds(), worst = 0, best_step = 1e30;
        for (int k = 0; k < decode_tokens; k++) {
            double s0 = now_seconds();
            if (forward_step(&b, &table, ids, 32 + k, 1) != 0)
                return 1;
            double ds = now_seconds() - s0;
            worst = ds > worst ? ds : worst;
            best_step = ds < best_step ? ds : best_step;
            ids[33 + k] = kvd_argmax(b.logits, b.vocab);
        }
        double dt = now_seconds() - t0, cpu = cpu_seconds() - c0;
        printf("decode: %d tokens in %.1f ms = %.1f tokens/s (step best %.2f ms = %.1f tokens/s, "
               "worst %.2f ms); %.1f GB/s of weights; used %.2f cores; %.1f tokens per "
               "CPU-second\n", decode_tokens, dt * 1e3, decode_tokens / dt, best_step * 1e3,
               1.0 / best_step, worst * 1e3, step_bytes * decode_tokens / dt / 1e9, cpu / dt,
               decode_tokens / cpu);
        kvd_block_table_deinit(b.pool, &table);
    }
    fflush(stdout);
    for (int r = 0; batch > 1 && r < (num_fused_runs > 0 ? num_fused_runs : 1); r++) {
        if (num_fused_runs > 0) {
            kvd_forward_set_fused_tokens(b.ctx, fused_runs[r]);
            printf("fused decode stages up to %d tokens:\n", fused_runs[r]);
        }
        if (batched_decode(&b, batch, decode_tokens, step_params) != 0)
            return 1;
        fflush(stdout);
    }

    FILE *plot = NULL;
    if (plot_data && num_experiments > 0) {
        plot = fopen(plot_data, "w");
        if (!plot) {
            fprintf(stderr, "bench_model: cannot write %s\n", plot_data);
            return 1;
        }
        fprintf(plot, "# new_tokens seconds_with_kv_cache seconds_without speedup (%s, %d threads)\n",
                dir, threads);
    }
    if (num_experiments > 0)
        printf("%-10s %14s %14s %8s  %s\n", "new tokens", "with KV cache", "without cache", "speedup",
               "same ids");
    for (int e = 0; e < num_experiments; e++) {
        int steps = experiments[e];
        make_prompt(ids, PROMPT_FOR_EXPERIMENT, 3);
        memcpy(ids2, ids, PROMPT_FOR_EXPERIMENT * sizeof(int32_t));
        double c0 = cpu_seconds(), w0 = now_seconds();
        double with = generate(&b, ids, PROMPT_FOR_EXPERIMENT, steps, true);
        double without = generate(&b, ids2, PROMPT_FOR_EXPERIMENT, steps, false);
        double cores = (cpu_seconds() - c0) / (now_seconds() - w0);
        if (with < 0 || without < 0)
            return 1;
        bool same = memcmp(ids, ids2, (size_t)(PROMPT_FOR_EXPERIMENT + steps) * sizeof(int32_t)) == 0;
        printf("%-10d %12.2f s %12.2f s %7.1fx  %-8s (used %.2f cores)\n", steps, with, without,
               without / with, same ? "yes" : "NO", cores);
        fflush(stdout);
        if (plot)
            fprintf(plot, "%d %.4f %.4f %.2f\n", steps, with, without, without / with);
        if (!same) {
            fprintf(stderr, "bench_model: cached and recomputed greedy ids differ\n");
            return 1;
        }
    }
    if (plot)
        fclose(plot);
    free(ids);
    free(ids2);
    free(b.logits);
    kvd_forward_destroy(b.ctx);
    kvd_kv_pool_destroy(b.pool);
    kvd_model_destroy(b.model);
    return 0;
}
