/* The closure directory: an open-addressing hash table (linear probing) of
 * name -> current version.
 *
 * Owns: dir_entry_t (the table at hdr->dir_off) and hdr->n_names.
 * Calls: nothing of pyshm; it stores blob offsets without following them.
 * Lock: every function runs with the heap lock held (heap.c, heap_lock).
 *
 * Invariant: dir_cap is a power of two (checked at attach), so masking an
 * index keeps every entry inside the table. */
#include "heap_layout.h"

#include <string.h>

uint64_t dir_hash(const char *name, size_t len) {
    uint64_t x = 0xcbf29ce484222325ull; /* FNV-1a */
    for (size_t i = 0; i < len; i++) x = (x ^ (uint8_t)name[i]) * 0x100000001b3ull;
    return x ? x : 1;
}

dir_entry_t *dir_entry(pyshm_heap_t *h, uint64_t i) {
    return (dir_entry_t *)(h->seg.rw + h->hdr->dir_off) + (i & (h->hdr->dir_cap - 1));
}

static int same_name(const dir_entry_t *e, uint64_t hash, const char *name, size_t len) {
    return e->hash == hash && e->name_len == len && memcmp(e->name, name, len) == 0;
}

dir_entry_t *dir_find(pyshm_heap_t *h, const char *name, size_t len) {
    uint64_t hash = dir_hash(name, len);
    for (uint64_t i = 0; i < h->hdr->dir_cap; i++) {
        dir_entry_t *e = dir_entry(h, hash + i);
        if (e->state == DIR_EMPTY) return NULL;
        if (e->state == DIR_USED && same_name(e, hash, name, len)) return e;
    }
    return NULL;
}

/* The entry that holds `name`, or the first reusable one on its probe path,
 * or NULL when the table is full.  A returned unused entry is not yet
 * visible: the caller fills it and sets state = DIR_USED last. */
dir_entry_t *dir_slot_for_insert(pyshm_heap_t *h, const char *name, size_t len) {
    dir_entry_t *found = dir_find(h, name, len);
    if (found) return found;
    uint64_t hash = dir_hash(name, len);
    for (uint64_t i = 0; i < h->hdr->dir_cap; i++) {
        dir_entry_t *e = dir_entry(h, hash + i);
        if (e->state != DIR_USED) return e;
    }
    return NULL;
}

/* Deletes an entry.  It becomes a tombstone unless the probe chain ends right
 * after it, in which case it and the tombstones before it become empty, so
 * churn of unique names does not fill the table with tombstones. */
void dir_remove(pyshm_heap_t *h, dir_entry_t *e) {
    uint64_t i = (uint64_t)(e - (dir_entry_t *)(h->seg.rw + h->hdr->dir_off));
    e->state = DIR_TOMB;
    h->hdr->n_names--;
    if (dir_entry(h, i + 1)->state != DIR_EMPTY) return;
    for (uint64_t k = 0; k < h->hdr->dir_cap && dir_entry(h, i - k)->state == DIR_TOMB; k++)
        dir_entry(h, i - k)->state = DIR_EMPTY;
}
