/* sequence.c - requests and their choices: ownership, token intake, stop rules, text.
 *
 * A request is built whole at submit time on the caller's thread: prompt and stop
 * copies, and for every choice its token array (prompt + max_tokens) and its text
 * buffer. The engine thread then never allocates for it while it runs.
 *
 * Text: each token's bytes go through the choice's kvd_detokenizer (which holds back
 * an incomplete UTF-8 character) into the pending buffer. A stop string may straddle
 * tokens, so the longest suffix of the pending text that could begin a stop string is
 * held back; everything before it is delivered. On a match the text is cut where the
 * stop string begins and the choice finishes with STOP: no part of the stop string is
 * ever delivered. Stop token ids and EOS finish with STOP without their text. With
 * include_stop_str_in_output the cut falls after the stop string, and a stop id's text
 * is kept (as vLLM). Before min_tokens tokens exist no stop rule applies (the sampler
 * keeps stop ids and EOS out meanwhile); a stop string may still begin in text held
 * back from before. Stop strings are byte strings with lengths: NULs are ordinary bytes.
 */
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

/* Bytes pending text can need: the held-back part (< longest stop string), one token
 * (push asks for max_token_bytes + 8 of room), and a flush of held-back UTF-8 bytes
 * (at most 8, each U+FFFD of 3 bytes). */
static size_t text_cap_for(size_t max_stop_len, size_t max_token_bytes)
{
    return max_stop_len + max_token_bytes + 16 + 8 * 3 + 1;
}

static size_t stop_length(const kvd_request_params *params, int i)
{
    return params->stop_len ? params->stop_len[i] : strlen(params->stop[i]);
}

eng_request *eng_request_create(const int32_t *prompt, int num_prompt, const kvd_request_params *params,
                                int max_tokens, const kvd_tokenizer *tok, const kvd_model_config *mcfg,
                                kvd_error *err)
{
    eng_request *req = calloc(1, sizeof *req);
    if (!req)
        goto nomem;
    req->num_prompt = num_prompt;
    req->params = *params;
    req->params.grammar = NULL; /* retained once the request is whole */
    req->max_tokens = max_tokens;
    req->n = params->n;
    req->forked = params->n == 1;
    req->num_unfinished = params->n;
    req->prompt = malloc((size_t)num_prompt * sizeof *req->prompt);
    if (!req->prompt)
        goto nomem;
    memcpy(req->prompt, prompt, (size_t)num_prompt * sizeof *prompt);

    if (params->num_stop > 0) {
        req->stop = calloc((size_t)params->num_stop, sizeof *req->stop);
        req->stop_len = calloc((size_t)params->num_stop, sizeof *req->stop_len);
        if (!req->stop || !req->stop_len)
            goto nomem;
        for (int i = 0; i < params->num_stop; i++) {
            req->stop_len[i] = stop_length(params, i);
            req->stop[i] = malloc(req->stop_len[i] + 1);
            if (!req->stop[i])
                goto nomem;
            memcpy(req->stop[i], params->stop[i], req->stop_len[i]);
            req->stop[i][req->stop_len[i]] = '\0';
            if (req->stop_len[i] > req->max_stop_len)
                req->max_stop_len = req->stop_len[i];
        }
    }
    req->params.stop = (const char *const *)req->stop;
    req->params.stop_len = req->stop_len;
    if (params->num_stop_token_ids > 0) {
        req->stop_ids = malloc((size_t)params->num_stop_token_ids * sizeof *req->stop_ids);
        if (!req->stop_ids)
            goto nomem;
        memcpy(req->stop_ids, params->stop_token_ids,
               (size_t)params->num_stop_token_ids * sizeof *req->stop_ids);
    }
    req->params.stop_token_ids = req->stop_ids;

    kvd_sampling_params *sp = &req->params.sampling;
    if (sp->num_logit_bias > 0) {
        req->logit_bias = malloc((size_t)sp->num_logit_bias * sizeof *req->logit_bias);
        if (!req->logit_bias)
            goto nomem;
        memcpy(req->logit_bias, params->sampling.logit_bias, (size_t)sp->num_logit_bias * sizeof *req->logit_bias);
    }
    sp->logit_bias = req->logit_bias;
    /* The ids that would end the choice: masked until min_tokens tokens exist. */
    sp->min_tokens_stop_ids = NULL;
    sp->num_min_tokens_stop_ids = 0;
    if (sp->min_tokens > 0) {
        const int num_eos = params->ignore_eos ? 0 : mcfg->num_eos_token_ids;
        req->min_tokens_ids = malloc((size_t)(params->num_stop_token_ids + num_eos + 1) * sizeof *req->min_tokens_ids);
        if (!req->min_tokens_ids)
            goto nomem;
        if (params->num_stop_token_ids > 0) /* else stop_token_ids may be NULL */
            memcpy(req->min_tokens_ids, params->stop_token_ids, (size_t)params->num_stop_token_ids * sizeof(int32_t));
        memcpy(req->min_tokens_ids + params->num_stop_token_ids, mcfg->eos_token_ids, (size_t)num_eos * sizeof(int32_t));
        sp->min_tokens_stop_ids = req->min_tokens_ids;
        sp->num_min_tokens_stop_ids = params->num_stop_token_ids + num_eos;
    }

    req->seqs = calloc((size_t)req->n, sizeof *req->seqs);
    if (!req->seqs)
        goto nomem;
    const size_t text_cap = text_cap_for(req->max_stop_len, kvd_tokenizer_max_token_bytes(tok));
    for (int c = 0; c < req->n; c++) {
        eng_seq *seq = &req->seqs[c];
        seq->req = req;
        seq->choice = c;
        seq->state = SEQ_IDLE;
        kvd_block_table_init(&seq->table);
        seq->tokens = malloc((size_t)(num_prompt + max_tokens) * sizeof *seq->tokens);
        seq->text = malloc(text_cap);
        if (!seq->tokens || !seq->text)
            goto nomem;
        seq->text_cap = text_cap;
        memcpy(seq->tokens, prompt, (size_t)num_prompt * sizeof *prompt);
        seq->num_tokens = num_prompt;
        /* Choice c draws from stream c of the seed (kvd_sampler.h says why not seed + c). */
        kvd_rng_seed_stream(&seq->rng, params->sampling.seed, (uint64_t)c);
        kvd_detokenizer_init(&seq->detok, tok, params->skip_special_tokens);
        if (params->grammar) {
            seq->grammar = kvd_grammar_matcher_create(params->grammar, NULL);
            if (!seq->grammar)
                goto nomem;
        }
    }
    req->params.grammar = kvd_grammar_retain(params->grammar);
    return req;

nomem:
    eng_request_destroy(NULL, req);
    kvd_error_set(err, KVD_ENOMEM, "engine: out of memory for a request of %d prompt tokens", num_prompt);
    return NULL;
}

void eng_request_destroy(kvd_kv_pool *pool, eng_request *req)
{
    if (!req)
        return;
    if (req->seqs) {
        for (int c = 0; c < req->n; c++) {
            eng_seq *seq = &req->seqs[c];
            if (pool) {
                kvd_block_table_deinit(pool, &seq->table);
            } else {
                /* Never admitted: the table holds no block, only maybe its arrays. */
                free(seq->table.blocks);
                free(seq->table.hashes);
            }
            free(seq->tokens);
            free(seq->text);
            kvd_grammar_matcher_destroy(seq->grammar);
        }
        free(req->seqs);
    }
    if (req->stop)
        for (int i = 0; i < req->params.num_stop; i++)
            free(req->stop[i]);
    free(req->stop);
    free(req->stop_len);
    free(req->stop_ids);
    free(req->logit_bias);
    free(req->min_tokens_ids);
    free(req->prompt);
    kvd_grammar_release(req->params.grammar);
    free(req);
}

static float ms_between(uint64_t from_ns, uint64_t to_ns)
{
    return from_ns && to_ns > from_ns ? (float)((double)(to_ns - from_ns) / 1e6) : 0.0f;
}

kvd_request_timing eng_request_timing(const eng_request *req)
{
    const uint64_t prefill_from = req->loaded_ns ? req->loaded_ns : req->admit_ns;
    return (kvd_request_timing){
        .queue_ms = ms_between(req->submit_ns, req->admit_ns),
        .load_ms = ms_between(req->admit_ns, req->loaded_ns),
        .prefill_ms = ms_between(prefill_from, req->first_token_ns),
        .prefill_steps = req->prefill_steps,
        .prefill_step_tokens = req->prefill_step_tokens,
    };
}

size_t eng_seq_text_capacity(const eng_seq *seq)
{
    return seq->text_cap;
}

static bool is_stop_token(const eng_request *req, const kvd_model_config *mcfg, int32_t token)
{
    for (int i = 0; i < req->params.num_stop_token_ids; i++)
        if (req->stop_ids[i] == token)
            return true;
    if (!req->params.ignore_eos)
        for (int i = 0; i < mcfg->num_eos_token_ids; i++)
            if (mcfg->eos_token_ids[i] == token)
                return true;
    return false;
}

/* Where the text ends at the earliest complete stop string (its start, or its end when
 * the stop string is kept; the earliest start wins, then the shortest), or -1. */
static long find_stop(const eng_request *req, const char *text, size_t len, bool keep_stop)
{
    long best = -1, best_end = -1;
    for (int i = 0; i < req->params.num_stop; i++) {
        const char *hit = memmem(text, len, req->stop[i], req->stop_len[i]);
        if (!hit)
            continue;
        long at = hit - text, end = at + (long)req->stop_len[i];
        if (best < 0 || at < best || (at == best && end < best_end)) {
            best = at;
            best_end = end;
        }
    }
    return keep_stop ? best_end : best;
}

/* Length of the longest proper suffix of text that is a prefix of some stop string. */
static size_t stop_holdback(const eng_request *req, const char *text, size_t len)
{
    size_t longest = req->max_stop_len > 0 ? req->max_stop_len - 1 : 0;
    for (size_t k = len < longest ? len : longest; k > 0; k--)
        for (int i = 0; i < req->params.num_stop; i++)
            if (req->stop_len[i] > k && memcmp(text + len - k, req->stop[i], k) == 0)
                return k;
    return 0;
}

kvd_finish_reason eng_seq_accept_token(eng_seq *seq, const kvd_model_config *mcfg, int32_t token,
                                       const kvd_sample_result *sample, kvd_event *ev)
{
    eng_request *req = seq->req;
    seq->tokens[seq->num_tokens++] = token;
    const int num_output = seq->num_tokens - req->num_prompt;
    const bool stops_apply = num_output >= req->params.sampling.min_tokens;
    const bool include_stop = req->params.include_stop_str_in_output;
    kvd_finish_reason finish = KVD_FINISH_NONE;
    bool matched_stop_string = false;

    if (stops_apply && is_stop_token(req, mcfg, token))
        finish = KVD_FINISH_STOP; /* its text is not part of the output unless include_stop */
    if (finish == KVD_FINISH_NONE || include_stop) {
        int n = kvd_detokenizer_push(&seq->detok, token, seq->text + seq->text_len,
                                     seq->text_cap - seq->text_len);
        /* An id past the tokenizer (embedding rows beyond its vocabulary) has no text. */
        if (n > 0)
            seq->text_len += (size_t)n;
    }
    if (finish == KVD_FINISH_NONE && stops_apply) {
        long at = find_stop(req, seq->text, seq->text_len, include_stop);
        if (at >= 0) {
            seq->text_len = (size_t)at;
            finish = KVD_FINISH_STOP;
            matched_stop_string = true;
        }
    }
    /* A complete grammar ends the choice whatever min_tokens says: nothing else may come. */
    if (finish == KVD_FINISH_NONE && seq->grammar && kvd_grammar_matcher_is_complete(seq->grammar))
        finish = KVD_FINISH_STOP;
    if (finish == KVD_FINISH_NONE && num_output >= req->max_tokens)
        finish = KVD_FINISH_LENGTH;
    if (finish != KVD_FINISH_NONE && !matched_stop_string) {
        /* Incomplete UTF-8 left at the end becomes U+FFFD, and may still complete a stop string. */
        int n = kvd_detokenizer_flush(&seq->detok, seq->text + seq->text_len, seq->text_cap - seq->text_len);
        if (n > 0)
            seq->text_len += (size_t)n;
        long at = stops_apply ? find_stop(req, seq->text, seq->text_len, include_stop) : -1;
        if (at >= 0) {
            seq->text_len = (size_t)at;
            finish = KVD_FINISH_STOP;
        }
    }

    size_t deliver = seq->text_len;
    if (finish == KVD_FINISH_NONE)
        deliver -= stop_holdback(req, seq->text, seq->text_len);
    memcpy(ev->text, seq->text, deliver);
    ev->text[deliver] = '\0';
    ev->text_len = deliver;
    memmove(seq->text, seq->text + deliver, seq->text_len - deliver);
    seq->text_len -= deliver;

    ev->request_id = req->id;
    ev->choice = seq->choice;
    ev->num_tokens = 1;
    ev->tokens[0] = token;
    if (ev->logprobs) {
        kvd_token_logprob *lp = &ev->logprobs[0];
        lp->token = token;
        lp->logprob = sample->logprob;
        lp->num_top = sample->num_top;
        memcpy(lp->top_tokens, sample->top_tokens, (size_t)sample->num_top * sizeof lp->top_tokens[0]);
        memcpy(lp->top_logprobs, sample->top_logprobs, (size_t)sample->num_top * sizeof lp->top_logprobs[0]);
    }
    ev->finish = finish;
    ev->prompt_tokens = req->num_prompt;
    ev->cached_tokens = req->cached_tokens;
    ev->timing = eng_request_timing(req);
    ev->completion_tokens = num_output;
    seq->finish = finish;
    return finish;
}
