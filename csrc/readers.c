/* The reader table: one slot per attached process, holding its pins.
 *
 * Owns: reader_t and pin_t (the table at hdr->readers_off); a slot is
 *   identified by (pid, start time) so that the pins of a dead process can
 *   be found and released.
 * Calls: proc.c (pyshm_proc_alive), fault.c (fault_point), blob.c (blob_at,
 *   blob_drop: a pin counts in its slot and in the blob's pins, and the last
 *   unpin of an obsolete blob frees it).
 * Lock: every function runs with the heap lock held (heap.c, heap_lock);
 *   only a slot's owner changes its pins. */
#include "heap_layout.h"
#include "proc.h"
#include "pyshm_errors.h"

#include <string.h>

/* Slot i, or NULL past the table (n_readers checked at attach). */
reader_t *reader_slot(pyshm_heap_t *h, int64_t i) {
    if (i < 0 || (uint64_t)i >= h->hdr->n_readers) return NULL;
    reader_t *r = (reader_t *)(h->seg.rw + h->hdr->readers_off) + i;
    /* hiwater bounds every scan of pins[]: never trust it past the array. */
    if (r->hiwater > PYSHM_PINS_PER_SLOT) r->hiwater = PYSHM_PINS_PER_SLOT;
    return r;
}

/* Gives back every pin the slot holds and frees the slot. */
void readers_release_slot(pyshm_heap_t *h, reader_t *r) {
    for (uint64_t i = 0; i < r->hiwater; i++) {
        pin_t *p = &r->pins[i];
        if (!p->count) continue;
        blob_t *b = blob_at(h, p->blob);
        uint64_t n = p->count;
        p->count = 0;
        if (b) {
            b->pins = b->pins > n ? b->pins - n : 0;
            if (!b->pins && b->state == BLOB_OBSOLETE) blob_drop(h, p->blob, 1);
        }
    }
    r->hiwater = 0;
    r->pid = 0;
}

int readers_reclaim_dead(pyshm_heap_t *h) {
    int n = 0;
    for (uint64_t i = 0; i < h->hdr->n_readers; i++) {
        reader_t *r = reader_slot(h, (int64_t)i);
        if (r->pid && !pyshm_proc_alive(r->pid, r->start)) {
            readers_release_slot(h, r);
            n++;
        }
    }
    return n;
}

/* The slots held by live processes (alive = 1) or by dead ones (alive = 0). */
uint64_t readers_count(pyshm_heap_t *h, int alive) {
    uint64_t n = 0;
    for (uint64_t i = 0; i < h->hdr->n_readers; i++) {
        reader_t *r = reader_slot(h, (int64_t)i);
        if (r->pid) n += !pyshm_proc_alive(r->pid, r->start) == !alive;
    }
    return n;
}

/* Takes a free slot for this process, after releasing dead ones if none is
 * free; sets h->slot. */
int readers_claim(pyshm_heap_t *h) {
    for (int pass = 0; pass < 2; pass++) {
        for (uint64_t i = 0; i < h->hdr->n_readers; i++) {
            reader_t *r = reader_slot(h, (int64_t)i);
            if (r->pid) continue;
            r->start = h->start;
            r->hiwater = 0;
            r->pid = h->pid; /* claimed: last store */
            h->slot = (int64_t)i;
            return PYSHM_OK;
        }
        if (!readers_reclaim_dead(h)) break;
    }
    return PYSHM_ERR_NOSLOT;
}

int readers_pin(pyshm_heap_t *h, uint64_t blob_off) {
    reader_t *r = reader_slot(h, h->slot);
    blob_t *b = blob_at(h, blob_off);
    if (!r || !b) return PYSHM_ERR_CORRUPT;
    pin_t *spare = NULL;
    for (uint64_t i = 0; i < r->hiwater; i++) {
        pin_t *p = &r->pins[i];
        if (p->count && p->blob == blob_off) { spare = p; break; }
        if (!p->count && !spare) spare = p;
    }
    if (!spare) {
        if (r->hiwater >= PYSHM_PINS_PER_SLOT) return PYSHM_ERR_PINS;
        spare = &r->pins[r->hiwater++];
        spare->count = 0;
    }
    if (!spare->count) spare->blob = blob_off; /* before count makes it live */
    spare->count++;
    fault_point(h, PYSHM_FAULT_PIN);
    b->pins++;
    return PYSHM_OK;
}

int readers_unpin(pyshm_heap_t *h, int64_t slot, uint64_t blob_off) {
    reader_t *r = reader_slot(h, slot);
    blob_t *b = blob_at(h, blob_off);
    if (!r || !b) return PYSHM_ERR_CORRUPT;
    for (uint64_t i = 0; i < r->hiwater; i++) {
        pin_t *p = &r->pins[i];
        if (!p->count || p->blob != blob_off) continue;
        p->count--;
        fault_point(h, PYSHM_FAULT_UNPIN);
        if (b->pins) b->pins--;
        if (!p->count && i + 1 == r->hiwater) r->hiwater--;
        if (!b->pins && b->state == BLOB_OBSOLETE) return blob_drop(h, blob_off, 0);
        return PYSHM_OK;
    }
    return PYSHM_ERR_STATE;
}
