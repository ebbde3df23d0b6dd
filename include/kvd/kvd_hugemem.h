/* kvd_hugemem.h - big buffers the kernel may back with 2 MiB pages.
 *
 * For buffers of tens of megabytes that are written a little more each time a batch
 * grows (weights, the engine's logits rows): an anonymous mapping aligned to 2 MiB and
 * advised MADV_HUGEPAGE, so a first write faults in 2 MiB at once instead of 512
 * separate 4 KiB faults (each of which costs ~12 us of system time on a VM: a 30 MB
 * logits buffer touched for the first time took 50 ms of each forward thread). Where
 * transparent huge pages are off the mapping still works, with small pages. Memory is
 * only committed where written, as for malloc. Any thread; the caller owns the buffer.
 */
#ifndef KVD_HUGEMEM_H
#define KVD_HUGEMEM_H

#include <stddef.h>

/* A zero-filled buffer of at least bytes (0 counts as 1), 2 MiB aligned; *mapped
 * receives what kvd_huge_free needs. NULL (errno set) when the mapping fails. */
void *kvd_huge_alloc(size_t bytes, size_t *mapped);
/* Frees a kvd_huge_alloc buffer (NULL does nothing). */
void kvd_huge_free(void *p, size_t mapped);

#endif
