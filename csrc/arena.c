/* The arena allocator: boundary-tagged blocks with segregated free lists.
 *
 * Owns: the block chain (block_t, primary) and the free lists (bins[],
 *   free_links_t, prev sizes and used_bytes, all derived).
 * Calls: fault.c (fault_point) only; it knows nothing of blobs except their
 *   header size (arena_largest_free).
 * Lock: every function runs with the heap lock held (heap.c, heap_lock).
 *
 * Crash safety: the free lists, `prev` sizes and used_bytes are rebuilt by
 * arena_rebuild().  Each change to the chain is ordered so that a walk from
 * arena_off sees a valid tiling after every single store. */
#include "heap_layout.h"
#include "pyshm_errors.h"

#include <sys/mman.h>
#include <unistd.h>

static uint64_t round_up(uint64_t n, uint64_t a) { return (n + a - 1) & ~(a - 1); }

static int bin_of(uint64_t size) { return 63 - __builtin_clzll(size); }

/* The block at off, or NULL unless off is aligned inside the arena and the
 * block's size keeps it there.  Offsets read from the segment go through
 * here (the arena lies inside the segment: layout_valid at attach), except
 * the list links list_remove follows (see links()). */
block_t *arena_block(pyshm_heap_t *h, uint64_t off) {
    heap_hdr_t *hdr = h->hdr;
    if (off < hdr->arena_off || off % PYSHM_ALIGN || off + sizeof(block_t) > hdr->arena_end)
        return NULL;
    block_t *b = (block_t *)(h->seg.rw + off);
    uint64_t size = BLOCK_SIZE(b);
    if (size < PYSHM_MIN_BLOCK || size > hdr->arena_end - off) return NULL;
    return b;
}

/* The links of the free block at off.  Unchecked: for offsets arena_block
 * has checked, and for the neighbours list_remove/list_push reach through
 * the lists this file keeps (derived data, rebuilt by every repair; a known
 * gap in the bounds checks: a scribbled link is followed as it is). */
static free_links_t *links(pyshm_heap_t *h, uint64_t off) {
    return (free_links_t *)(h->seg.rw + off + sizeof(block_t));
}

/* The free-list links of the block at off, or NULL when off is no block of
 * the arena.  They lie inside the block (PYSHM_MIN_BLOCK covers them), so
 * inside the arena; whether the block is free is the caller's question. */
free_links_t *arena_links(pyshm_heap_t *h, uint64_t off) {
    return arena_block(h, off) ? links(h, off) : NULL;
}

static void list_push(pyshm_heap_t *h, uint64_t off, uint64_t size) {
    uint64_t *head = &h->hdr->bins[bin_of(size)];
    free_links_t *l = links(h, off);
    l->prev = 0;
    l->next = *head;
    if (*head) links(h, *head)->prev = off;
    *head = off;
}

static void list_remove(pyshm_heap_t *h, uint64_t off, uint64_t size) {
    free_links_t *l = links(h, off);
    if (l->prev) links(h, l->prev)->next = l->next;
    else h->hdr->bins[bin_of(size)] = l->next;
    if (l->next) links(h, l->next)->prev = l->prev;
}

static void set_next_prev(pyshm_heap_t *h, uint64_t off, uint64_t size) {
    uint64_t next = off + size;
    if (next < h->hdr->arena_end) ((block_t *)(h->seg.rw + next))->prev = size;
}

void arena_release_pages(pyshm_heap_t *h, uint64_t off, uint64_t size) {
    if (size < PYSHM_PUNCH_MIN) return;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    /* Keep the block header and free links; give back whole pages after them. */
    uint64_t from = round_up(off + sizeof(block_t) + sizeof(free_links_t), page);
    uint64_t to = (off + size) & ~(page - 1);
    if (to > from) madvise(h->seg.rw + from, to - from, MADV_REMOVE);
}

void arena_init(pyshm_heap_t *h) {
    heap_hdr_t *hdr = h->hdr;
    uint64_t size = (hdr->arena_end - hdr->arena_off) & ~(uint64_t)(PYSHM_ALIGN - 1);
    hdr->arena_end = hdr->arena_off + size;
    block_t *b = (block_t *)(h->seg.rw + hdr->arena_off);
    b->size = size;
    b->prev = 0;
    list_push(h, hdr->arena_off, size);
    hdr->used_bytes = 0;
}

/* First fit in the block's own bin, else any block of a larger bin. */
static uint64_t find_fit(pyshm_heap_t *h, uint64_t need) {
    for (int bin = bin_of(need); bin < PYSHM_NBINS; bin++) {
        for (uint64_t off = h->hdr->bins[bin]; off; off = links(h, off)->next) {
            block_t *b = arena_block(h, off);
            if (!b) return 0; /* stale list: the caller repairs */
            if (BLOCK_SIZE(b) >= need) return off;
        }
    }
    return 0;
}

int arena_alloc(pyshm_heap_t *h, uint64_t payload, uint64_t *out) {
    uint64_t need = round_up(payload + sizeof(block_t), PYSHM_ALIGN);
    if (need < PYSHM_MIN_BLOCK) need = PYSHM_MIN_BLOCK;
    if (payload > h->hdr->arena_end) return PYSHM_ERR_FULL;
    uint64_t off = find_fit(h, need);
    if (!off) return PYSHM_ERR_FULL;
    block_t *b = (block_t *)(h->seg.rw + off);
    uint64_t size = BLOCK_SIZE(b);
    list_remove(h, off, size);
    if (size - need >= PYSHM_MIN_BLOCK) {
        /* Split: the remainder's header is written inside the block first,
         * then one store shrinks the block; a walk sees either the old
         * block or both. */
        uint64_t rest = off + need;
        block_t *r = (block_t *)(h->seg.rw + rest);
        r->size = size - need;
        r->prev = need;
        fault_point(h, PYSHM_FAULT_ALLOC_SPLIT);
        b->size = need | BLOCK_USED;
        set_next_prev(h, rest, size - need);
        list_push(h, rest, size - need);
    } else {
        b->size = size | BLOCK_USED;
        need = size;
    }
    h->hdr->used_bytes += need;
    *out = off;
    return PYSHM_OK;
}

int arena_free(pyshm_heap_t *h, uint64_t off, int give_back) {
    heap_hdr_t *hdr = h->hdr;
    block_t *b = arena_block(h, off);
    if (!b || !(b->size & BLOCK_USED)) return PYSHM_ERR_CORRUPT;
    uint64_t size = BLOCK_SIZE(b);
    hdr->used_bytes -= size;
    if (give_back) arena_release_pages(h, off, size);
    /* Swallow a free successor while still marked used: one store. */
    block_t *n = off + size < hdr->arena_end ? arena_block(h, off + size) : NULL;
    if (n && !(n->size & BLOCK_USED)) {
        list_remove(h, off + size, BLOCK_SIZE(n));
        size += BLOCK_SIZE(n);
        b->size = size | BLOCK_USED;
        fault_point(h, PYSHM_FAULT_FREE_MERGE);
    }
    /* A free predecessor swallows us; otherwise we become free. */
    block_t *p = b->prev ? arena_block(h, off - b->prev) : NULL;
    if (p && !(p->size & BLOCK_USED)) {
        uint64_t poff = off - b->prev;
        list_remove(h, poff, BLOCK_SIZE(p));
        off = poff;
        size += BLOCK_SIZE(p);
        p->size = size;
    } else {
        b->size = size;
    }
    set_next_prev(h, off, size);
    list_push(h, off, size);
    return PYSHM_OK;
}

/* Walks the chain, fixes `prev`, merges runs of free blocks, rebuilds the
 * free lists and used_bytes.  Returns PYSHM_ERR_CORRUPT if the chain itself
 * is broken, which no crash can cause. */
int arena_rebuild(pyshm_heap_t *h) {
    heap_hdr_t *hdr = h->hdr;
    for (int i = 0; i < PYSHM_NBINS; i++) hdr->bins[i] = 0;
    hdr->used_bytes = 0;
    uint64_t prev_size = 0, free_off = 0, free_size = 0;
    for (uint64_t off = hdr->arena_off; off < hdr->arena_end;) {
        block_t *b = arena_block(h, off);
        if (!b) return PYSHM_ERR_CORRUPT;
        uint64_t size = BLOCK_SIZE(b);
        if (b->size & BLOCK_USED) {
            if (free_size) { list_push(h, free_off, free_size); free_size = 0; }
            b->prev = prev_size;
            hdr->used_bytes += size;
            prev_size = size;
        } else if (free_size) {
            free_size += size; /* merge into the free run */
            ((block_t *)(h->seg.rw + free_off))->size = free_size;
            prev_size = free_size;
        } else {
            b->prev = prev_size;
            free_off = off;
            free_size = size;
            prev_size = size;
        }
        off += size;
        if (off < hdr->arena_end && arena_block(h, off))
            ((block_t *)(h->seg.rw + off))->prev = prev_size;
    }
    if (free_size) list_push(h, free_off, free_size);
    return PYSHM_OK;
}

/* Gives the pages of every large free block back to the OS. */
void arena_trim(pyshm_heap_t *h) {
    for (int bin = 0; bin < PYSHM_NBINS; bin++)
        for (uint64_t off = h->hdr->bins[bin]; off; off = links(h, off)->next) {
            block_t *b = arena_block(h, off);
            if (!b) return;
            arena_release_pages(h, off, BLOCK_SIZE(b));
        }
}

uint64_t arena_largest_free(pyshm_heap_t *h) {
    for (int bin = PYSHM_NBINS - 1; bin >= 0; bin--) {
        uint64_t best = 0;
        for (uint64_t off = h->hdr->bins[bin]; off; off = links(h, off)->next) {
            block_t *b = arena_block(h, off);
            if (!b) break;
            if (BLOCK_SIZE(b) > best) best = BLOCK_SIZE(b);
        }
        if (best) return best - sizeof(block_t) - sizeof(blob_t);
    }
    return 0;
}
