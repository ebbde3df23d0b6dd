/* sampler_vocab.h - passes over a whole row of logits, private to the sampler.
 *
 * A Qwen2 row is 151936 floats, so these few passes dominate sampling time. Each
 * has an AVX-512 body and a portable one that compute bit-identical results (the
 * same IEEE operations per lane, no fused multiply-add, sums per CHUNK ids over 16
 * lanes reduced by one fixed pairwise tree, chunks added in double), so a sample
 * never depends on which one ran. The caller picks once with
 * kvd_vocab_avx512_supported() and passes the choice to every call.
 */
#ifndef KVD_SAMPLER_VOCAB_H
#define KVD_SAMPLER_VOCAB_H

#include <stdbool.h>
#include <stdint.h>

#define KVD_VOCAB_CHUNK 256

bool kvd_vocab_avx512_supported(void);

/* exp(x) to ~1e-7 relative, exactly 0 below -87 (so -inf gives 0). */
float kvd_vocab_exp1(float x);

/* Largest value of x[0..n), NaN ignored; -inf when there is none. */
float kvd_vocab_max(bool avx512, const float *x, int n);

/* w[i] = exp((x[i] - m) * inv_t) by kvd_vocab_exp1's formula; 0 for a NaN x[i]. */
void kvd_vocab_exp(bool avx512, float *w, const float *x, int n, float m, float inv_t);

/* sums[c] = sum of w[c*CHUNK .. min(n, (c+1)*CHUNK)); sums has ceil(n / CHUNK) entries. */
void kvd_vocab_chunk_sums(bool avx512, float *sums, const float *w, int n);

/* kvd_vocab_chunk_sums of the weights kvd_vocab_exp(x, n, m, inv_t) would write, bit
 * for bit, without writing them (one pass over x instead of a write and two reads: the
 * log-softmax's normaliser). */
void kvd_vocab_exp_chunk_sums(bool avx512, float *sums, const float *x, int n, float m, float inv_t);

/* kvd_vocab_chunk_sums of a row that is zero but for w[j] at ids[j] (k of them, ids
 * ascending, all < n), bit for bit, in O(k + n / CHUNK). */
void kvd_vocab_chunk_sums_sparse(float *sums, const int32_t *ids, const float *w, int k, int n);

/* Sum (over chunks, in double) and count of the w[i] >= floor_w. */
double kvd_vocab_mass_at_least(bool avx512, const float *w, int n, float floor_w, int *count);

/* First i in [start, n) with x[i] > t (NaN never), or n. */
int kvd_vocab_find_gt(bool avx512, const float *x, int start, int n, float t);

/* Number of x[i] >= t (NaN never). */
int kvd_vocab_count_ge(bool avx512, const float *x, int n, float t);

/* Copies the x[i] >= t, in id order, to vals (and their ids to ids unless NULL);
 * returns how many. */
int kvd_vocab_compress_ge(bool avx512, float *vals, int32_t *ids, const float *x, int n, float t);

/* x[i] = -inf for i < n where bit i of allowed (bit i % 32 of word i / 32) is clear;
 * returns kvd_vocab_max(x, n_max) of the masked row (n_max <= n), in the same pass. */
float kvd_vocab_mask_max(bool avx512, float *x, const uint32_t *allowed, int n, int n_max);

/* w[i] = 0 where key[i] < t or key[i] is NaN (key may be w itself). */
void kvd_vocab_zero_below(bool avx512, float *w, const float *key, int n, float t);

#endif
