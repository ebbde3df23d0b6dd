/* sample_step.c - a step's samples, one per sequence, across the forward's threads.
 *
 * With 49-65 sequences asking for top-20 logprobs, sampling took 10-20 ms a step on the
 * engine thread alone while the forward's other threads idled, on top of a forward of
 * the same order: the steps a running stream waits for. Each job here is one sequence's
 * whole sample (copy of a shared row, grammar mask, kvd_sampler_sample, grammar accept),
 * and everything a job touches is its own (its sequence, its row or its thread's copy,
 * its thread's sampler and mask; the compiled grammar locks its cache inside), so jobs
 * run on any thread in any order and a sample is the one kvd_sampler_sample gives that
 * row alone. What follows a sample (detokenising, stop strings, events) stays serial in
 * the engine, in the jobs' order.
 *
 * Parallel or not: a team run returns only once every thread has reported, so on a
 * loaded machine (at nice 19 beside load 10 on 2 vCPUs) a preempted team thread made
 * the phase twice as long as sampling on the engine thread alone, while quiet it is
 * about half. So each mode's wall time per job is tracked (a moving average) and the
 * faster one runs, the other being tried every PROBE_EVERY runs to keep its figure
 * current. The mode never changes a result.
 */
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"
#include "kvd/kvd_clock.h"

struct eng_sampling {
    const kvd_model_config *mcfg;
    int vocab_size;
    int num_lanes;
    eng_sample_lane *lanes;    /* (num_lanes) */
    eng_sample_job *jobs;      /* (max_jobs) */
    int num_jobs;
    int max_jobs;
    /* mode choice: wall ns per job, moving average, 0 until measured; [0] on the
     * caller alone, [1] on the forward's threads */
    double ns_per_job[2];
    unsigned runs;
    bool force_parallel;
};

enum { PROBE_EVERY = 16 };

eng_sampling *eng_sampling_create(const kvd_model_config *mcfg, int vocab_size, int num_printable, int num_lanes,
                                  int max_jobs)
{
    if (num_lanes < 1 || max_jobs < 1)
        return NULL;
    eng_sampling *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->mcfg = mcfg;
    s->vocab_size = vocab_size;
    s->num_lanes = num_lanes;
    s->max_jobs = max_jobs;
    s->lanes = calloc((size_t)num_lanes, sizeof *s->lanes);
    s->jobs = calloc((size_t)max_jobs, sizeof *s->jobs);
    if (!s->lanes || !s->jobs) {
        eng_sampling_destroy(s);
        return NULL;
    }
    for (int i = 0; i < num_lanes; i++) {
        eng_sample_lane *lane = &s->lanes[i];
        lane->sampler = kvd_sampler_create(vocab_size, num_printable);
        lane->row = malloc((size_t)vocab_size * sizeof *lane->row);
        lane->grammar_mask = malloc((size_t)(vocab_size + 31) / 32 * sizeof *lane->grammar_mask);
        if (!lane->sampler || !lane->row || !lane->grammar_mask) {
            eng_sampling_destroy(s);
            return NULL;
        }
    }
    return s;
}

void eng_sampling_destroy(eng_sampling *s)
{
    if (!s)
        return;
    for (int i = 0; s->lanes && i < s->num_lanes; i++) {
        kvd_sampler_destroy(s->lanes[i].sampler);
        free(s->lanes[i].row);
        free(s->lanes[i].grammar_mask);
    }
    free(s->lanes);
    free(s->jobs);
    free(s);
}

bool eng_sampling_add(eng_sampling *s, eng_seq *seq, float *row, bool copy)
{
    if (s->num_jobs == s->max_jobs)
        return false;
    s->jobs[s->num_jobs++] = (eng_sample_job){.seq = seq, .row = row, .copy = copy};
    return true;
}

int eng_sampling_num_jobs(const eng_sampling *s)
{
    return s->num_jobs;
}

eng_sample_job *eng_sampling_job(eng_sampling *s, int i)
{
    return &s->jobs[i];
}

void eng_sampling_clear(eng_sampling *s)
{
    s->num_jobs = 0;
}

/* mask := what seq's grammar allows next, plus EOS and the stop ids where the grammar
 * may end. */
static int grammar_mask(const eng_sampling *s, eng_seq *seq, uint32_t *mask)
{
    const eng_request *req = seq->req;
    int rc = kvd_grammar_matcher_fill_mask(seq->grammar, mask, NULL);
    if (rc < 0 || !kvd_grammar_matcher_can_end(seq->grammar))
        return rc;
    const kvd_model_config *mc = s->mcfg;
    for (int i = 0; !req->params.ignore_eos && i < mc->num_eos_token_ids; i++) {
        int32_t id = mc->eos_token_ids[i];
        if (id >= 0 && id < s->vocab_size)
            mask[id >> 5] |= 1u << (id & 31);
    }
    for (int i = 0; i < req->params.num_stop_token_ids; i++) {
        int32_t id = req->stop_ids[i];
        if (id >= 0 && id < s->vocab_size)
            mask[id >> 5] |= 1u << (id & 31);
    }
    return 0;
}

static void sample_job(void *arg, int item, int thread)
{
    eng_sampling *s = arg;
    eng_sample_job *job = &s->jobs[item];
    eng_sample_lane *lane = &s->lanes[thread];
    eng_seq *seq = job->seq;
    eng_request *req = seq->req;
    float *row = job->row;
    const int num_output = seq->num_tokens - req->num_prompt;
    kvd_sampling_params sp = req->params.sampling;
    /* A row the choices share is copied only when this sample would write into it (16
     * copies of 600 KB per n = 16 request in the step that forks it, otherwise). */
    if (job->copy && (seq->grammar || kvd_sampler_rewrites(&sp, num_output))) {
        memcpy(lane->row, row, (size_t)s->vocab_size * sizeof *row);
        row = lane->row;
    }
    job->rc = 0;
    if (seq->grammar) {
        job->rc = grammar_mask(s, seq, lane->grammar_mask);
        sp.allowed = lane->grammar_mask;
    }
    if (job->rc == 0)
        job->rc = kvd_sampler_sample(lane->sampler, &sp, row, req->prompt, req->num_prompt,
                                     seq->tokens + req->num_prompt, num_output, &seq->rng, &job->res);
    /* EOS and stop ids have no place in the grammar: they were allowed where it may end */
    if (job->rc == 0 && seq->grammar)
        (void)kvd_grammar_matcher_accept(seq->grammar, job->res.token, NULL);
}

void eng_sampling_force_parallel(eng_sampling *s, bool force)
{
    s->force_parallel = force;
}

static bool choose_parallel(eng_sampling *s)
{
    if (s->force_parallel)
        return true;
    if (s->ns_per_job[0] == 0.0 || s->ns_per_job[1] == 0.0)
        return s->ns_per_job[1] == 0.0; /* measure each mode once */
    const bool faster = s->ns_per_job[1] <= s->ns_per_job[0];
    return ++s->runs % PROBE_EVERY == 0 ? !faster : faster;
}

void eng_sampling_run(eng_sampling *s, kvd_forward_ctx *fwd)
{
    const bool can_share = fwd && s->num_jobs >= 2 && s->num_lanes >= kvd_forward_num_threads(fwd) &&
                           kvd_forward_num_threads(fwd) > 1;
    if (!can_share) {
        for (int i = 0; i < s->num_jobs; i++)
            sample_job(s, i, 0);
        return;
    }
    const bool parallel = choose_parallel(s);
    const uint64_t t0 = kvd_now_ns();
    if (parallel) {
        kvd_forward_for_each(fwd, s->num_jobs, sample_job, s);
    } else {
        for (int i = 0; i < s->num_jobs; i++)
            sample_job(s, i, 0);
    }
    const double per_job = (double)(kvd_now_ns() - t0) / s->num_jobs;
    double *avg = &s->ns_per_job[parallel];
    *avg = *avg == 0.0 ? per_job : 0.75 * *avg + 0.25 * per_job;
}
