/* probe_streams.c - streaming read bandwidth by the spacing of the streams a thread reads.
 *
 * A one-row quantized product reads 4 weight streams a thread, one per group of 16
 * output columns; adjacent groups sit a group's bytes apart (15,232 B for a 896-wide
 * Q8_0 row). This reads 1 GiB on 2 threads, each thread 4 streams `spacing` bytes apart
 * that move on together by 4 x spacing once each has read `spacing` bytes (spacing "far":
 * each stream a quarter of the thread's half, read end to end), with 64-byte AVX-512
 * loads and a PREFETCHT0 1 KiB ahead as the kernels do, and prints GB/s per spacing,
 * `--rounds` times. With --huge the buffer is advised MADV_HUGEPAGE (as the weights are).
 *
 * Usage: probe_streams [--rounds N] [--huge]
 */
#include <omp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kvd/kvd_clock.h"

/* a whole 64-byte line; target_clones gives AVX-512 loads where the CPU has them */
typedef uint64_t line64 __attribute__((vector_size(64), aligned(64)));

#define THREADS 2
#define STREAMS 4
#define PREFETCH_AHEAD 1024

/* GB/s of one pass; spacing 0: "far" (each stream a quarter of the thread's half) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "default")))
#endif
static double read_pass(const char *buf, size_t bytes, size_t spacing)
{
    uint64_t t0 = kvd_now_ns();
    uint64_t total = 0;
#pragma omp parallel num_threads(THREADS) reduction(^ : total)
    {
        size_t per = bytes / THREADS;
        const char *mine = buf + per * (size_t)omp_get_thread_num();
        size_t seg = spacing ? spacing : per / STREAMS;
        line64 acc = {0};
        for (size_t base = 0; base + STREAMS * seg <= per; base += STREAMS * seg)
            for (size_t i = 0; i + 64 <= seg; i += 64)
                for (int s = 0; s < STREAMS; s++) {
                    const char *p = mine + base + (size_t)s * seg + i;
                    __builtin_prefetch(p + PREFETCH_AHEAD, 0, 3);
                    acc ^= *(const line64 *)p;
                }
        for (int j = 0; j < 8; j++)
            total ^= acc[j];
    }
    double dt = (double)(kvd_now_ns() - t0) * 1e-9;
    volatile uint64_t sink = total; /* keeps the reads */
    (void)sink;
    return (double)bytes / dt / 1e9;
}

int main(int argc, char **argv)
{
    int rounds = 4;
    bool huge = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc)
            rounds = atoi(argv[++i]);
        else if (strcmp(argv[i], "--huge") == 0)
            huge = true;
        else {
            fprintf(stderr, "usage: %s [--rounds N] [--huge]\n", argv[0]);
            return 2;
        }
    }
    const size_t bytes = (size_t)1 << 30, align = (size_t)2 << 20;
    char *map = mmap(NULL, bytes + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    char *buf = (char *)(((uintptr_t)map + align - 1) & ~(uintptr_t)(align - 1));
    if (huge)
        madvise(buf, bytes, MADV_HUGEPAGE);
    for (size_t i = 0; i < bytes / 8; i++)
        ((uint64_t *)buf)[i] = i;
    /* whole lines: the loads are aligned */
    static const size_t spacings[] = {15232, 65536, 262144, 300032, (size_t)4 << 20, 4999936,
                                      (size_t)16 << 20, (size_t)64 << 20, 0};
    printf("%d threads x %d streams, GB/s by spacing (bytes; 0 = far)%s\n", THREADS, STREAMS,
           huge ? ", MADV_HUGEPAGE" : "");
    for (int r = 0; r < rounds; r++) {
        for (size_t s = 0; s < sizeof spacings / sizeof spacings[0]; s++)
            printf("%zu: %.1f%s", spacings[s], read_pass(buf, bytes, spacings[s]),
                   s + 1 < sizeof spacings / sizeof spacings[0] ? " | " : "\n");
        fflush(stdout);
    }
    munmap(map, bytes + align);
    return 0;
}
