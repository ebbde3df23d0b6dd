/* forward.c - the batched Qwen2 forward pass over block tables.
 *
 * One step runs every token of the batch (decode tokens and prefill chunks of many
 * sequences) through the layers together: each linear layer is one matrix product
 * over all rows, attention runs per (sequence, kv head, chunk of rows) through the
 * sequence's block table. Layer by layer:
 *   xn = rmsnorm(x); q,k,v = xn Wq,k,v^T + b; rope(q, k); store k, v in their slots;
 *   attn = paged_attention(q); x += attn Wo^T; xn = rmsnorm(x);
 *   h = silu(xn Wg^T) * (xn Wu^T); x += h Wd^T
 * then logits = rmsnorm(x) lm_head^T for the rows the batch asks for.
 *
 * Threads: the context's persistent team (threads.h) runs the whole step; products
 * split output columns (decode steps: claimed in chunks, see claim_columns), row-wise
 * kernels split rows, attention hands out work items dynamically, with a barrier between
 * dependent stages. No result depends on the split (see kvd_kernels.h and
 * kvd_attention.h), so a sequence's logits are the same
 * whatever else is in the batch. All buffers are sized at creation; a step never
 * allocates.
 *
 * Steps of up to 16 tokens (decodes of up to 16 sequences) take 4 barriers a layer
 * instead of 8: there a stage is short, a barrier costs the partner's wake-up (on a
 * loaded machine a scheduler slice, spun for), and a thread idling at it leaves memory
 * idle too (16 sequences, 0.5B Q8_0, two cores at load 10-12: ~20% more tokens per
 * CPU-second than with a barrier after every stage). Each thread norms (and quantizes)
 * all of the step's rows into its own buffer, the same bits in every thread, so no
 * barrier follows the norms; each owns whole kv heads, computes their q/k/v columns,
 * ropes and stores them and runs their attention without waiting for the others.
 * Barriers remain where a stage reads every column another wrote: after attention,
 * o_proj, gate/up and down_proj.
 */
#include "kvd/kvd_forward.h"

#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvd/kvd_attention.h"
#include "kvd/kvd_kernels.h"
#include "kvd/kvd_quant.h"
#include "threads.h"

/* Rows of one attention work item: small enough to balance a long prefill over the
 * threads, large enough that a K/V tile is widened once for many queries. */
#define ATTN_ITEM_ROWS 16
/* Most tokens of a step run with the fused decode stages (see the top): each thread
 * norms every row, which costs little for the few rows of a decode step. */
#define FUSED_MAX_TOKENS 16

typedef struct attn_item {
    int query;   /* index into ctx->queries */
    int kv_head;
    int row_begin, row_end;
} attn_item;

/* The products whose columns a fused decode step hands out in chunks, each with its own
 * counter: three a layer, then the lm_head (the first stage past the last layer). */
enum { STAGE_O_PROJ, STAGE_GATE_UP, STAGE_DOWN, STAGES_PER_LAYER };

static int stage_index(int layer, int stage)
{
    return STAGES_PER_LAYER * layer + stage;
}

static int stage_count(int num_layers)
{
    return stage_index(num_layers, 0) + 1;
}

struct kvd_forward_ctx {
    const kvd_model *model;
    kvd_kv_pool *pool;
    kvd_isa isa;
    int max_tokens, max_seqs, max_logit_rows, num_threads;
    bool force_threads;  /* every step on num_threads, however small (tests) */
    int fused_tokens;    /* steps of up to this many tokens take the fused stages */
    int hidden, q_dim, kv_dim, inter, vocab, head_dim;
    kvd_attention_shape shape;
    float *inv_freq;     /* (head_dim/2) */
    float *x;            /* (max_tokens, hidden) residual stream */
    float *xn;           /* (max_tokens, hidden) normed sublayer input */
    /* q, k, v and attn are dead before a layer's gate/up products write and born after
     * its down product read: both sets live in stage_mem (see stage_layout) */
    float *stage_mem;
    float *q;            /* (max_tokens, q_dim) */
    float *k;            /* (max_tokens, kv_dim) */
    float *v;            /* (max_tokens, kv_dim) */
    float *attn;         /* (max_tokens, q_dim) attention output */
    float *gate;         /* (max_tokens, inter) gate, then silu(gate)*up */
    float *up;           /* (max_tokens, inter) */
    float *rope;         /* (max_tokens, head_dim) cos then sin per token */
    float *final_rows;   /* (max_logit_rows, hidden) normed rows that get logits */
    int *positions;      /* (max_tokens) */
    int *token_seq;      /* (max_tokens) batch sequence of each token */
    int *logit_tokens;   /* (max_logit_rows) token index of each logits row */
    kvd_attention_query *queries; /* (max_seqs) */
    attn_item *items;    /* (max_items) */
    int max_items;
    float *attn_scratch;   /* (num_threads, attn_stride) */
    void *xq_mem;          /* quantized weights: xn's rows quantized once for q/k/v and gate/up */
    kvd_qinput xq;
    void *xq_inter_mem;    /* ... and the rows of silu(gate)*up, each thread its own blocks */
    kvd_qinput xq_inter;
    uint32_t *xw;          /* bf16 weights on VDPBF16PS: xn's rows rounded once (kvd_kernels.h) */
    uint32_t *xw_inter;    /* ... and silu(gate)*up's, each thread its own columns */
    size_t xw_stride, xw_inter_stride;
    size_t attn_stride;
    /* fused decode steps: each thread's own normed rows and their quantized or rounded
     * copies, FUSED_MAX_TOKENS rows a thread */
    float *own_xn;         /* (num_threads, FUSED_MAX_TOKENS, hidden) */
    void *own_xq_mem;      /* num_threads x own_xq_bytes */
    size_t own_xq_bytes;
    kvd_qinput *own_xq;    /* (num_threads) */
    uint32_t *own_xw;      /* (num_threads, FUSED_MAX_TOKENS, xw_stride) */
    /* fused decode steps: the next unclaimed panel of each product stage (stage_index),
     * zeroed before every step */
    _Atomic int *stage_next; /* (stage_count) */
    kvd_team *team;
};

static void *alloc_floats(size_t n)
{
    size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes ? bytes : 64);
}

/* One region for the two sets of a layer's buffers that are never live together: the
 * attention stages' q, k, v, attn and the MLP's gate, up. Every step passes a barrier
 * between the last read of one set and the first write of the other (o_proj's before
 * the MLP norm, down_proj's before the next layer), so the pages a 512-token step
 * touches are the MLP's alone (0.5B: 19 MiB, not 23). Offsets are whole cache lines. */
static void stage_layout(kvd_forward_ctx *ctx, size_t T)
{
    const size_t line = 16; /* floats */
    size_t q = (T * ctx->q_dim + line - 1) & ~(line - 1);
    size_t kv = (T * ctx->kv_dim + line - 1) & ~(line - 1);
    size_t inter = (T * ctx->inter + line - 1) & ~(line - 1);
    size_t attention = 2 * q + 2 * kv, mlp = 2 * inter;
    ctx->stage_mem = alloc_floats(attention > mlp ? attention : mlp);
    if (!ctx->stage_mem)
        return;
    ctx->q = ctx->stage_mem;
    ctx->attn = ctx->q + q;
    ctx->k = ctx->attn + q;
    ctx->v = ctx->k + kv;
    ctx->gate = ctx->stage_mem;
    ctx->up = ctx->gate + inter;
}

void kvd_forward_destroy(kvd_forward_ctx *ctx)
{
    if (!ctx)
        return;
    free(ctx->inv_freq);
    free(ctx->x);
    free(ctx->xn);
    free(ctx->stage_mem);
    free(ctx->rope);
    free(ctx->final_rows);
    free(ctx->positions);
    free(ctx->token_seq);
    free(ctx->logit_tokens);
    free(ctx->queries);
    free(ctx->items);
    free(ctx->attn_scratch);
    free(ctx->xq_mem);
    free(ctx->xq_inter_mem);
    free(ctx->xw);
    free(ctx->xw_inter);
    free(ctx->own_xn);
    free(ctx->own_xq_mem);
    free(ctx->own_xq);
    free(ctx->own_xw);
    free(ctx->stage_next);
    kvd_team_destroy(ctx->team);
    free(ctx);
}

static int check_matrix(const kvd_matrix *m, int rows, int cols, const char *name, int layer,
                        kvd_error *err)
{
    if (!m->data || m->rows != rows || m->cols != cols)
        return kvd_error_set(err, KVD_EINVAL,
                             "forward: layer %d %s is %dx%d, the config needs %dx%d", layer, name,
                             m->rows, m->cols, rows, cols);
    return 0;
}

/* Cores this process may run on. */
static int available_cores(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

kvd_forward_ctx *kvd_forward_create(const kvd_model *model, kvd_kv_pool *pool, int max_tokens,
                                    int max_seqs, int max_logit_rows, int num_threads,
                                    kvd_error *err)
{
    const kvd_model_config *c = &model->config;
    const kvd_kv_config *kv = kvd_kv_pool_config(pool);
    if (max_tokens < 1 || max_seqs < 1 || max_logit_rows < 0) {
        kvd_error_set(err, KVD_EINVAL, "forward: max_tokens (%d) and max_seqs (%d) must be >= 1, "
                      "max_logit_rows (%d) >= 0", max_tokens, max_seqs, max_logit_rows);
        return NULL;
    }
    if (c->num_kv_heads < 1 || c->num_heads % c->num_kv_heads != 0 || c->head_dim % 2 != 0 ||
        c->head_dim > 256 || c->head_dim < 2) {
        kvd_error_set(err, KVD_EUNSUPPORTED,
                      "forward: %d heads, %d kv heads, head_dim %d: need heads divisible by kv "
                      "heads and an even head_dim <= 256", c->num_heads, c->num_kv_heads, c->head_dim);
        return NULL;
    }
    if (kv->num_layers != c->num_layers || kv->num_kv_heads != c->num_kv_heads ||
        kv->head_dim != c->head_dim) {
        kvd_error_set(err, KVD_EINVAL,
                      "forward: KV pool shape (%d layers, %d kv heads, head_dim %d) does not match "
                      "the model (%d, %d, %d)", kv->num_layers, kv->num_kv_heads, kv->head_dim,
                      c->num_layers, c->num_kv_heads, c->head_dim);
        return NULL;
    }
    int hidden = c->hidden_size, q_dim = c->num_heads * c->head_dim;
    int kv_dim = c->num_kv_heads * c->head_dim, inter = c->intermediate_size;
    for (int l = 0; l < c->num_layers; l++) {
        const kvd_layer_weights *w = &model->layers[l];
        if (check_matrix(&w->q_proj, q_dim, hidden, "q_proj", l, err) ||
            check_matrix(&w->k_proj, kv_dim, hidden, "k_proj", l, err) ||
            check_matrix(&w->v_proj, kv_dim, hidden, "v_proj", l, err) ||
            check_matrix(&w->o_proj, hidden, q_dim, "o_proj", l, err) ||
            check_matrix(&w->gate_proj, inter, hidden, "gate_proj", l, err) ||
            check_matrix(&w->up_proj, inter, hidden, "up_proj", l, err) ||
            check_matrix(&w->down_proj, hidden, inter, "down_proj", l, err))
            return NULL;
    }
    if (check_matrix(&model->embed_tokens, c->vocab_size, hidden, "embed_tokens", -1, err) ||
        check_matrix(&model->lm_head, c->vocab_size, hidden, "lm_head", -1, err))
        return NULL;

    kvd_forward_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        kvd_error_set(err, KVD_ENOMEM, "forward: out of memory");
        return NULL;
    }
    ctx->model = model;
    ctx->pool = pool;
    ctx->isa = kvd_isa_detect();
    ctx->max_tokens = max_tokens;
    ctx->max_seqs = max_seqs;
    ctx->max_logit_rows = max_logit_rows;
    ctx->fused_tokens = FUSED_MAX_TOKENS;
    ctx->num_threads = num_threads > 0 ? num_threads : available_cores();
    ctx->hidden = hidden;
    ctx->q_dim = q_dim;
    ctx->kv_dim = kv_dim;
    ctx->inter = inter;
    ctx->vocab = c->vocab_size;
    ctx->head_dim = c->head_dim;
    ctx->shape = (kvd_attention_shape){c->num_heads, c->num_kv_heads, c->head_dim,
                                       1.0f / sqrtf((float)c->head_dim)};
    size_t T = (size_t)max_tokens;
    ctx->max_items = c->num_kv_heads * (max_tokens / ATTN_ITEM_ROWS + max_seqs);
    ctx->attn_stride = (kvd_attention_scratch_floats(&ctx->shape) + 15) & ~(size_t)15;
    ctx->inv_freq = alloc_floats((size_t)c->head_dim / 2);
    ctx->x = alloc_floats(T * hidden);
    ctx->xn = alloc_floats(T * hidden);
    stage_layout(ctx, T);
    ctx->rope = alloc_floats(T * c->head_dim);
    ctx->final_rows = alloc_floats((size_t)(max_logit_rows > 0 ? max_logit_rows : 1) * hidden);
    ctx->positions = malloc(T * sizeof(int));
    ctx->token_seq = malloc(T * sizeof(int));
    ctx->logit_tokens = malloc((size_t)(max_logit_rows > 0 ? max_logit_rows : 1) * sizeof(int));
    ctx->queries = malloc((size_t)max_seqs * sizeof(kvd_attention_query));
    ctx->items = malloc((size_t)ctx->max_items * sizeof(attn_item));
    ctx->attn_scratch = alloc_floats(ctx->attn_stride * ctx->num_threads);
    size_t own_rows = (size_t)ctx->num_threads * FUSED_MAX_TOKENS;
    ctx->own_xn = alloc_floats(own_rows * hidden);
    bool quantized = false;
    for (int l = 0; l < c->num_layers; l++)
        quantized = quantized || kvd_dtype_is_quantized(model->layers[l].q_proj.dtype) ||
                    kvd_dtype_is_quantized(model->layers[l].gate_proj.dtype);
    if (quantized) {
        size_t bytes = (kvd_qinput_bytes(max_tokens, hidden) + 63) & ~(size_t)63;
        ctx->xq_mem = aligned_alloc(64, bytes);
        if (ctx->xq_mem)
            kvd_qinput_init(&ctx->xq, ctx->xq_mem, max_tokens, hidden);
        bytes = (kvd_qinput_bytes(max_tokens, inter) + 63) & ~(size_t)63;
        ctx->xq_inter_mem = aligned_alloc(64, bytes);
        if (ctx->xq_inter_mem)
            kvd_qinput_init(&ctx->xq_inter, ctx->xq_inter_mem, max_tokens, inter);
        ctx->own_xq_bytes = (kvd_qinput_bytes(FUSED_MAX_TOKENS, hidden) + 63) & ~(size_t)63;
        ctx->own_xq_mem = aligned_alloc(64, ctx->own_xq_bytes * ctx->num_threads);
        ctx->own_xq = calloc((size_t)ctx->num_threads, sizeof *ctx->own_xq);
        for (int i = 0; ctx->own_xq_mem && ctx->own_xq && i < ctx->num_threads; i++)
            kvd_qinput_init(&ctx->own_xq[i], (char *)ctx->own_xq_mem + ctx->own_xq_bytes * i,
                            FUSED_MAX_TOKENS, hidden);
    }
    bool words = kvd_matmul_takes_words(ctx->isa, &model->layers[0].q_proj) ||
                 kvd_matmul_takes_words(ctx->isa, &model->layers[0].down_proj);
    if (words) {
        ctx->xw_stride = kvd_bf16_words_stride(hidden);
        ctx->xw_inter_stride = kvd_bf16_words_stride(inter);
        ctx->xw = alloc_floats(T * ctx->xw_stride);
        ctx->xw_inter = alloc_floats(T * ctx->xw_inter_stride);
        ctx->own_xw = alloc_floats(own_rows * ctx->xw_stride);
    }
    ctx->stage_next = calloc((size_t)stage_count(c->num_layers), sizeof *ctx->stage_next);
    ctx->team = kvd_team_create(ctx->num_threads);
    if (!ctx->team || !ctx->stage_next ||
        (quantized && (!ctx->xq_mem || !ctx->xq_inter_mem || !ctx->own_xq_mem || !ctx->own_xq)) ||
        (words && (!ctx->xw || !ctx->xw_inter || !ctx->own_xw)) || !ctx->own_xn ||
        !ctx->inv_freq || !ctx->x || !ctx->xn || !ctx->q || !ctx->k || !ctx->v || !ctx->attn ||
        !ctx->gate || !ctx->up || !ctx->rope || !ctx->final_rows || !ctx->positions ||
        !ctx->token_seq || !ctx->logit_tokens || !ctx->queries || !ctx->items ||
        !ctx->attn_scratch) {
        kvd_forward_destroy(ctx);
        kvd_error_set(err, KVD_ENOMEM, "forward: out of memory for %d-token scratch buffers "
                      "or %d threads", max_tokens, num_threads);
        return NULL;
    }
    kvd_rope_inv_freq(ctx->inv_freq, c->head_dim, c->rope_theta);
    return ctx;
}

/* Checks the batch and fills positions, token_seq, queries, items and logit_tokens.
 * Returns the number of logits rows, or a negative code. */
static int plan_batch(kvd_forward_ctx *ctx, const kvd_forward_batch *b, int *num_items,
                      kvd_error *err)
{
    const kvd_model_config *c = &ctx->model->config;
    if (b->num_tokens < 1 || b->num_tokens > ctx->max_tokens)
        return kvd_error_set(err, KVD_EINVAL, "forward: batch of %d tokens (context made for 1..%d)",
                             b->num_tokens, ctx->max_tokens);
    if (b->num_seqs < 1 || b->num_seqs > ctx->max_seqs)
        return kvd_error_set(err, KVD_EINVAL, "forward: batch of %d sequences (context made for 1..%d)",
                             b->num_seqs, ctx->max_seqs);
    for (int t = 0; t < b->num_tokens; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= c->vocab_size)
            return kvd_error_set(err, KVD_EINVAL, "forward: token %d is id %d, outside the vocabulary "
                                 "(%d)", t, b->tokens[t], c->vocab_size);
        ctx->token_seq[t] = -1;
    }
    int rows = 0, items = 0, next_token = 0;
    for (int s = 0; s < b->num_seqs; s++) {
        const kvd_forward_seq *seq = &b->seqs[s];
        if (seq->num_new < 1 || seq->num_past < 0 || seq->token_offset < next_token ||
            seq->token_offset + seq->num_new > b->num_tokens)
            return kvd_error_set(err, KVD_EINVAL, "forward: sequence %d: tokens [%d, %d) overlap, go "
                                 "backwards or leave the batch of %d", s, seq->token_offset,
                                 seq->token_offset + seq->num_new, b->num_tokens);
        int end = seq->num_past + seq->num_new;
        if (end > c->max_position_embeddings)
            return kvd_error_set(err, KVD_EINVAL, "forward: sequence %d reaches position %d, past "
                                 "max_position_embeddings %d", s, end, c->max_position_embeddings);
        if (!seq->table || end > seq->table->num_tokens)
            return kvd_error_set(err, KVD_EINVAL, "forward: sequence %d needs %d slots, its block table "
                                 "reserved %d", s, end, seq->table ? seq->table->num_tokens : 0);
        next_token = seq->token_offset + seq->num_new;
        int new_rows = seq->logits == KVD_LOGITS_ALL ? seq->num_new : seq->logits == KVD_LOGITS_LAST;
        if (rows + new_rows > ctx->max_logit_rows)
            return kvd_error_set(err, KVD_EINVAL, "forward: batch asks for more than %d logits rows",
                                 ctx->max_logit_rows);
        for (int i = 0; i < seq->num_new; i++) {
            int t = seq->token_offset + i;
            ctx->token_seq[t] = s;
            ctx->positions[t] = seq->num_past + i;
            if (seq->logits == KVD_LOGITS_ALL || (seq->logits == KVD_LOGITS_LAST && i == seq->num_new - 1))
                ctx->logit_tokens[rows++] = t;
        }
        ctx->queries[s] = (kvd_attention_query){
            .table = seq->table, .first_pos = seq->num_past, .num_rows = seq->num_new,
            .q = ctx->q + (size_t)seq->token_offset * ctx->q_dim, .q_stride = ctx->q_dim,
            .out = ctx->attn + (size_t)seq->token_offset * ctx->q_dim, .out_stride = ctx->q_dim,
        };
        /* Longest rows (latest positions) first: the dynamic schedule then ends balanced. */
        for (int r1 = seq->num_new; r1 > 0; r1 -= ATTN_ITEM_ROWS)
            for (int h = 0; h < c->num_kv_heads; h++)
                ctx->items[items++] = (attn_item){s, h, r1 > ATTN_ITEM_ROWS ? r1 - ATTN_ITEM_ROWS : 0, r1};
    }
    for (int t = 0; t < b->num_tokens; t++)
        if (ctx->token_seq[t] < 0)
            return kvd_error_set(err, KVD_EINVAL, "forward: token %d belongs to no sequence", t);
    *num_items = items;
    return rows;
}

/* [begin, end) of n output columns split over nth threads in whole weight panels. */
static void split(int n, int ith, int nth, int *begin, int *end)
{
    int units = (n + KVD_PANEL_ROWS - 1) / KVD_PANEL_ROWS;
    *begin = (int)((int64_t)units * ith / nth) * KVD_PANEL_ROWS;
    *end = (int)((int64_t)units * (ith + 1) / nth) * KVD_PANEL_ROWS;
    *begin = *begin < n ? *begin : n;
    *end = *end < n ? *end : n;
}

/* Fused decode steps hand a product's columns out in chunks as threads ask, so a thread
 * that a busy host slowed takes fewer of them and its partner does not wait at the next
 * barrier for its static half. Chunks shrink (a quarter of what is left for two
 * threads) down to one group pair of the one-row kernels, so the last ones end close
 * together; any split gives the same bits. Claims [*begin, *end), false when none is
 * left. */
#define MIN_CHUNK_PANELS 2
static bool claim_columns(_Atomic int *next, int n, int nth, int *begin, int *end)
{
    int units = (n + KVD_PANEL_ROWS - 1) / KVD_PANEL_ROWS;
    int at = atomic_load_explicit(next, memory_order_relaxed), take;
    do {
        if (at >= units)
            return false;
        take = (units - at) / (2 * nth);
        take = take < MIN_CHUNK_PANELS ? MIN_CHUNK_PANELS : take;
        take = take < units - at ? take : units - at;
    } while (!atomic_compare_exchange_weak_explicit(next, &at, at + take, memory_order_relaxed,
                                                    memory_order_relaxed));
    *begin = at * KVD_PANEL_ROWS;
    *end = (at + take) * KVD_PANEL_ROWS < n ? (at + take) * KVD_PANEL_ROWS : n;
    return true;
}

static void split_rows(int n, int ith, int nth, int *begin, int *end)
{
    *begin = (int)((int64_t)n * ith / nth);
    *end = (int)((int64_t)n * (ith + 1) / nth);
}

/* Threads for a step: all of them, unless the step is so small (a tiny model, a few
 * tokens) that its ~10 barriers per layer would cost more than they save; on a
 * loaded machine a barrier can wait a scheduler time slice. Results never depend on
 * the count. Estimate: weights streamed at 20 GB/s plus arithmetic at 100 GFLOP/s,
 * one core's worth; below 2 ms, one thread. */
static int step_threads(const kvd_forward_ctx *ctx, int tokens, int logit_rows)
{
    const kvd_model *m = ctx->model;
    double layer_params = (double)ctx->hidden * (2.0 * ctx->q_dim + 2.0 * ctx->kv_dim + 3.0 * ctx->inter);
    /* bytes per weight, quantized blocks included (every dtype's rows hold 256-value blocks) */
    double bytes = layer_params * m->config.num_layers *
                   (double)kvd_dtype_row_bytes(m->layers[0].q_proj.dtype, 256) / 256;
    double flops = 2.0 * tokens * layer_params * m->config.num_layers;
    if (logit_rows > 0) {
        bytes += (double)ctx->vocab * kvd_dtype_row_bytes(m->lm_head.dtype, ctx->hidden);
        flops += 2.0 * logit_rows * (double)ctx->vocab * ctx->hidden;
    }
    double micros = bytes / 20e3 + flops / 100e3;
    return micros < 2000.0 && !ctx->force_threads ? 1 : ctx->num_threads;
}

void kvd_forward_force_threads(kvd_forward_ctx *ctx, bool force)
{
    ctx->force_threads = force;
}

void kvd_forward_set_fused_tokens(kvd_forward_ctx *ctx, int max_tokens)
{
    ctx->fused_tokens = max_tokens < 0 ? 0 : max_tokens > FUSED_MAX_TOKENS ? FUSED_MAX_TOKENS : max_tokens;
}

int kvd_forward_num_threads(const kvd_forward_ctx *ctx)
{
    return ctx->num_threads;
}

typedef struct for_each_args {
    kvd_team *team;
    int num_items;
    kvd_forward_item_fn fn;
    void *arg;
} for_each_args;

static void for_each_body(void *arg, int ith, int nth)
{
    (void)nth;
    const for_each_args *fa = arg;
    for (int i = kvd_team_next(fa->team); i < fa->num_items; i = kvd_team_next(fa->team))
        fa->fn(fa->arg, i, ith);
}

void kvd_forward_for_each(kvd_forward_ctx *ctx, int num_items, kvd_forward_item_fn fn, void *arg)
{
    if (num_items <= 0)
        return;
    for_each_args fa = {ctx->team, num_items, fn, arg};
    /* The team is idle here, and posting the job publishes the reset counter (threads.c
     * posts with a sequentially consistent increment), so no barrier is needed. */
    kvd_team_reset_counter(ctx->team);
    const int nth = num_items < ctx->num_threads ? num_items : ctx->num_threads;
    kvd_team_run(ctx->team, nth, for_each_body, &fa);
}

/* What one step's threads share. */
typedef struct step_args {
    kvd_forward_ctx *ctx;
    const kvd_forward_batch *batch;
    int rows;      /* logits rows */
    int num_items; /* attention work items */
    bool fused;    /* the fused decode stages (see the top) */
} step_args;

/* Where a thread's stage inputs go: the shared buffers, the threads splitting the rows,
 * or (fused steps) the thread's own, every row. */
typedef struct stage_input {
    float *xn;          /* normed rows, stride hidden */
    kvd_qinput *xq;     /* their quantized copies, or NULL (no quantized weights) */
    uint32_t *xw;       /* their bf16 words, stride xw_stride, or NULL */
    int r0, r1;         /* rows this thread norms */
} stage_input;

/* Rows [r0, r1) of x (row stride ldx, hidden wide) quantized once into in->xq for the
 * products whose first matrix is `first` (returned; NULL when first is not quantized)
 * or rounded once into in->xw for the bf16 products. */
static const kvd_qinput *stage_copies(kvd_forward_ctx *ctx, const stage_input *in,
                                      const float *x, int ldx, const kvd_matrix *first)
{
    const int H = ctx->hidden;
    for (int t = in->r0; in->xw && t < in->r1; t++)
        kvd_bf16_round_cols(ctx->isa, in->xw + (size_t)t * ctx->xw_stride, x + (size_t)t * ldx,
                            H, 0, H);
    if (!in->xq || !kvd_dtype_is_quantized(first->dtype) || first->cols != H)
        return NULL;
    kvd_qinput_quantize(ctx->isa, in->xq, first->dtype, x, ldx, in->r0, in->r1);
    return in->xq;
}

/* Rows [r0, r1) of x normed with `weight` into in->xn, then stage_copies of them. */
static const kvd_qinput *norm_stage_input(kvd_forward_ctx *ctx, const stage_input *in,
                                          const float *weight, const kvd_matrix *first)
{
    const int H = ctx->hidden;
    for (int t = in->r0; t < in->r1; t++)
        kvd_rmsnorm(ctx->isa, in->xn + (size_t)t * H, ctx->x + (size_t)t * H, weight, H,
                    ctx->model->config.rms_norm_eps);
    return stage_copies(ctx, in, in->xn, H, first);
}

/* down_proj's input, silu(gate)*up, quantized, or NULL when down quantizes its own: a
 * thread owns columns [a, b) of every row (a and b whole panels of 32), and a Q8_0-family
 * block of 32 is quantized from its own values alone, so each thread quantizes its blocks
 * where it computed them. Q8_K blocks (256) would straddle the threads' columns: those
 * products quantize their input themselves. */
static kvd_qinput *down_input(kvd_forward_ctx *ctx, const kvd_matrix *down)
{
    if (!ctx->xq_inter_mem || !kvd_dtype_is_quantized(down->dtype) ||
        kvd_dtype_block_values(down->dtype) != 32 || down->cols != ctx->inter)
        return NULL;
    return &ctx->xq_inter;
}

/* One product of a stage: from xq (the stage's input quantized for `first`) when that
 * serves w, from xw (x's rows rounded to bf16 words, row stride xw_stride) when w takes
 * them, else from the float rows x. */
static void stage_product(kvd_isa isa, const kvd_qinput *xq, const kvd_matrix *first, float *out,
                          int ldo, const float *x, int ldx, const uint32_t *xw, size_t xw_stride,
                          int m, const kvd_matrix *w, const float *bias, bool accumulate, int a,
                          int b)
{
    if (xq && kvd_qinput_serves(first, w))
        kvd_qmatmul_cols_input(isa, out, ldo, xq, m, w, bias, accumulate, a, b);
    else if (xw && kvd_matmul_takes_words(isa, w))
        kvd_matmul_cols_words(isa, out, ldo, xw, xw_stride, m, w, bias, accumulate, a, b);
    else
        kvd_matmul_cols(isa, out, ldo, x, ldx, m, w, bias, accumulate, a, b);
}

/* Columns [*a, *b) of stage `stage`'s product (n columns) for this thread, while it
 * returns true: chunks claimed from the stage's counter in fused steps, otherwise the
 * thread's static part, once (round counts the calls). */
static bool stage_columns(const step_args *sa, int stage, int n, int ith, int nth, int *round,
                          int *a, int *b)
{
    if (sa->fused)
        return claim_columns(&sa->ctx->stage_next[stage], n, nth, a, b);
    if ((*round)++ > 0)
        return false;
    split(n, ith, nth, a, b);
    return true;
}

static void forward_body(void *arg, int ith, int nth)
{
    const step_args *sa = arg;
    kvd_forward_ctx *ctx = sa->ctx;
    const kvd_forward_batch *batch = sa->batch;
    const kvd_model *model = ctx->model;
    const kvd_model_config *c = &model->config;
    const int M = batch->num_tokens, H = ctx->hidden, QD = ctx->q_dim, KD = ctx->kv_dim;
    const int I = ctx->inter, HD = ctx->head_dim, rows = sa->rows;
    const int group = c->num_heads / c->num_kv_heads;
    const kvd_isa isa = ctx->isa;
    const bool fused = sa->fused;
    kvd_team *team = ctx->team;
    float *at_scratch = ctx->attn_scratch + ctx->attn_stride * (size_t)ith;
    int r0, r1, a, b;
    split_rows(M, ith, nth, &r0, &r1);
    for (int t = r0; t < r1; t++) {
        kvd_matrix_row(ctx->x + (size_t)t * H, &model->embed_tokens, batch->tokens[t]);
        kvd_rope_angles(ctx->rope + (size_t)t * HD, ctx->positions[t], ctx->inv_freq, HD);
    }
    stage_input in = {ctx->xn, ctx->xq_mem ? &ctx->xq : NULL, ctx->xw, r0, r1};
    /* fused: this thread's kv heads [h0, h1), all their rows */
    int h0 = 0, h1 = c->num_kv_heads, t0 = r0, t1 = r1;
    if (fused) {
        size_t own = (size_t)ith * FUSED_MAX_TOKENS;
        in = (stage_input){ctx->own_xn + own * H, ctx->own_xq ? &ctx->own_xq[ith] : NULL,
                           ctx->own_xw ? ctx->own_xw + own * ctx->xw_stride : NULL, 0, M};
        split_rows(c->num_kv_heads, ith, nth, &h0, &h1);
        t0 = 0;
        t1 = M;
    }
    kvd_team_barrier(team);
    for (int l = 0; l < c->num_layers; l++) {
        const kvd_layer_weights *w = &model->layers[l];
        const kvd_qinput *qin = norm_stage_input(ctx, &in, w->input_norm, &w->q_proj);
        if (!fused)
            kvd_team_barrier(team);
        if (fused) {
            a = h0 * group * HD;
            b = h1 * group * HD;
        } else {
            split(QD, ith, nth, &a, &b);
        }
        stage_product(isa, qin, &w->q_proj, ctx->q, QD, in.xn, H, in.xw, ctx->xw_stride, M,
                      &w->q_proj, w->q_bias, false, a, b);
        if (fused) {
            a = h0 * HD;
            b = h1 * HD;
        } else {
            split(KD, ith, nth, &a, &b);
        }
        stage_product(isa, qin, &w->q_proj, ctx->k, KD, in.xn, H, in.xw, ctx->xw_stride, M,
                      &w->k_proj, w->k_bias, false, a, b);
        stage_product(isa, qin, &w->q_proj, ctx->v, KD, in.xn, H, in.xw, ctx->xw_stride, M,
                      &w->v_proj, w->v_bias, false, a, b);
        if (!fused) {
            if (ith == 0)
                kvd_team_reset_counter(team);
            kvd_team_barrier(team);
        }
        /* rows [t0, t1), heads [h0, h1) (q heads in their groups): a fused thread its
         * own heads of every row, otherwise every head of its rows */
        for (int t = t0; t < t1; t++) {
            const float *cs = ctx->rope + (size_t)t * HD;
            kvd_rope(isa, ctx->q + (size_t)t * QD + (size_t)h0 * group * HD, (h1 - h0) * group,
                     HD, cs);
            kvd_rope(isa, ctx->k + (size_t)t * KD + (size_t)h0 * HD, h1 - h0, HD, cs);
            kvd_kv_store_heads(isa, ctx->pool, l, batch->seqs[ctx->token_seq[t]].table,
                               ctx->positions[t], ctx->k + (size_t)t * KD, ctx->v + (size_t)t * KD,
                               h0, h1);
        }
        if (fused) {
            for (int i = 0; i < sa->num_items; i++) {
                const attn_item *it = &ctx->items[i];
                if (it->kv_head >= h0 && it->kv_head < h1)
                    kvd_paged_attention_part(isa, ctx->pool, l, &ctx->shape,
                                             &ctx->queries[it->query], it->kv_head, it->row_begin,
                                             it->row_end, at_scratch);
            }
        } else {
            kvd_team_barrier(team);
            for (int i = kvd_team_next(team); i < sa->num_items; i = kvd_team_next(team)) {
                const attn_item *it = &ctx->items[i];
                kvd_paged_attention_part(isa, ctx->pool, l, &ctx->shape, &ctx->queries[it->query],
                                         it->kv_head, it->row_begin, it->row_end, at_scratch);
            }
        }
        kvd_team_barrier(team);
        /* fused: the thread's chunks of o_proj read every row of attn, quantized (or
         * rounded) once into its own buffers rather than once per chunk */
        const bool own_attn = fused && w->o_proj.cols == H;
        qin = own_attn ? stage_copies(ctx, &in, ctx->attn, QD, &w->o_proj) : NULL;
        for (int round = 0; stage_columns(sa, stage_index(l, STAGE_O_PROJ), H, ith, nth, &round, &a, &b);)
            stage_product(isa, qin, &w->o_proj, ctx->x, H, ctx->attn, QD, own_attn ? in.xw : NULL,
                          ctx->xw_stride, M, &w->o_proj, NULL, true, a, b);
        kvd_team_barrier(team);
        qin = norm_stage_input(ctx, &in, w->post_norm, &w->gate_proj);
        if (!fused)
            kvd_team_barrier(team);
        kvd_qinput *down_in = down_input(ctx, &w->down_proj);
        for (int round = 0; stage_columns(sa, stage_index(l, STAGE_GATE_UP), I, ith, nth, &round, &a, &b);) {
            stage_product(isa, qin, &w->gate_proj, ctx->gate, I, in.xn, H, in.xw, ctx->xw_stride,
                          M, &w->gate_proj, NULL, false, a, b);
            stage_product(isa, qin, &w->gate_proj, ctx->up, I, in.xn, H, in.xw, ctx->xw_stride,
                          M, &w->up_proj, NULL, false, a, b);
            for (int t = 0; t < M && a < b; t++) {
                kvd_swiglu(isa, ctx->gate + (size_t)t * I + a, ctx->up + (size_t)t * I + a, b - a);
                /* down's input rounded where it was computed, each thread its own columns */
                if (ctx->xw_inter)
                    kvd_bf16_round_cols(isa, ctx->xw_inter + (size_t)t * ctx->xw_inter_stride,
                                        ctx->gate + (size_t)t * I, I, a, b);
            }
            if (down_in && a < b)
                kvd_qinput_quantize_cols(isa, down_in, w->down_proj.dtype, ctx->gate, I, 0, M, a, b);
        }
        kvd_team_barrier(team);
        for (int round = 0; stage_columns(sa, stage_index(l, STAGE_DOWN), H, ith, nth, &round, &a, &b);)
            stage_product(isa, down_in, &w->down_proj, ctx->x, H, ctx->gate, I, ctx->xw_inter,
                          ctx->xw_inter_stride, M, &w->down_proj, NULL, true, a, b);
        kvd_team_barrier(team);
    }
    if (rows > 0) {
        /* fused: every thread norms every logits row into its own buffer (rows <= M) */
        float *final_rows = fused ? in.xn : ctx->final_rows;
        int f0 = 0, f1 = rows;
        if (!fused)
            split_rows(rows, ith, nth, &f0, &f1);
        for (int r = f0; r < f1; r++)
            kvd_rmsnorm(isa, final_rows + (size_t)r * H, ctx->x + (size_t)ctx->logit_tokens[r] * H,
                        model->final_norm, H, c->rms_norm_eps);
        if (!fused)
            kvd_team_barrier(team);
        /* fused: the rows quantized (or rounded) once for all of the thread's chunks */
        stage_input logit_in = {in.xn, in.xq, in.xw, 0, rows};
        const kvd_qinput *lq =
            fused ? stage_copies(ctx, &logit_in, final_rows, H, &model->lm_head) : NULL;
        const int lm_stage = stage_index(c->num_layers, 0);
        for (int round = 0; stage_columns(sa, lm_stage, ctx->vocab, ith, nth, &round, &a, &b);)
            stage_product(isa, lq, &model->lm_head, batch->logits, ctx->vocab, final_rows, H,
                          fused ? in.xw : NULL, ctx->xw_stride, rows, &model->lm_head, NULL, false,
                          a, b);
    }
}

int kvd_forward(kvd_forward_ctx *ctx, const kvd_forward_batch *batch, kvd_error *err)
{
    int num_items = 0;
    int rows = plan_batch(ctx, batch, &num_items, err);
    if (rows < 0)
        return rows;
    if (rows > 0 && !batch->logits)
        return kvd_error_set(err, KVD_EINVAL, "forward: batch asks for %d logits rows but has no "
                             "logits buffer", rows);
    int nth = step_threads(ctx, batch->num_tokens, rows);
    /* fused decode stages when every thread gets as many kv heads as the others */
    bool fused = batch->num_tokens <= ctx->fused_tokens && ctx->model->config.num_kv_heads % nth == 0;
    step_args sa = {ctx, batch, rows, num_items, fused};
    /* posting the job publishes these (threads.c: a sequentially consistent increment) */
    for (int i = 0; fused && i < stage_count(ctx->model->config.num_layers); i++)
        atomic_store_explicit(&ctx->stage_next[i], 0, memory_order_relaxed);
    kvd_team_run(ctx->team, nth, forward_body, &sa);
    return 0;
}
