/* hugemem.c - anonymous mappings aligned to 2 MiB for transparent huge pages.
 *
 * mmap only guarantees 4 KiB alignment, and the kernel backs a range with a huge page
 * only where a whole aligned 2 MiB lies inside the mapping: map 2 MiB more than asked,
 * then unmap the unaligned head and the tail.
 */
#include "kvd/kvd_hugemem.h"

#include <errno.h>
#include <stdint.h>
#include <sys/mman.h>

#define HUGE_PAGE ((size_t)2 << 20)

void *kvd_huge_alloc(size_t bytes, size_t *mapped)
{
    if (bytes > SIZE_MAX - 2 * HUGE_PAGE) {
        errno = ENOMEM;
        return NULL;
    }
    size_t rounded = bytes ? (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE : HUGE_PAGE;
    size_t over = rounded + HUGE_PAGE;
    uint8_t *raw = mmap(NULL, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        return NULL;
    uintptr_t aligned = ((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    size_t head = aligned - (uintptr_t)raw;
    if (head)
        munmap(raw, head);
    size_t tail = over - head - rounded;
    if (tail)
        munmap((uint8_t *)aligned + rounded, tail);
#ifdef MADV_HUGEPAGE
    (void)madvise((void *)aligned, rounded, MADV_HUGEPAGE); /* advisory: fine if THP is off */
#endif
    *mapped = rounded;
    return (void *)aligned;
}

void kvd_huge_free(void *p, size_t mapped)
{
    if (p)
        munmap(p, mapped);
}
