/* The session table (see sessions.h). */
#include "sessions.h"
#include "pyshm_errors.h"
#include "robust_lock.h"
#include "segment.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SESS_VERSION 1u

typedef struct {
    uint32_t seq;            /* odd while a writer changes this slot */
    uint32_t state;          /* PYSHM_SESS_* */
    pyshm_session_t s;
    uint8_t pad[256 - 8 - sizeof(pyshm_session_t)];
} slot_t;                    /* 256 bytes: four cache lines, never shared with a neighbour's writes */

typedef struct {
    pyshm_seg_header_t seg;
    uint32_t version;
    uint32_t capacity;       /* live sessions allowed */
    uint64_t n_slots;        /* per table: 2 * capacity rounded up to a power of two */
    uint64_t slots_off;      /* two tables of n_slots each; generation & 1 says which is current */
    uint32_t generation;     /* moves when a rehash flips tables (readers start over) */
    uint32_t pad;
    uint64_t active, tombstones, repairs;   /* guarded by lock */
    pthread_mutex_t lock;    /* every writer holds it */
} hdr_t;

struct pyshm_sessions {
    pyshm_segment_t seg;
    hdr_t *hdr;
    int fault;
};

/* Table k's slots (k = generation & 1 is the current one). */
static slot_t *table(const pyshm_sessions_t *t, uint32_t k) {
    return (slot_t *)(t->seg.rw + t->hdr->slots_off) + (uint64_t)(k & 1) * t->hdr->n_slots;
}

/* Writers hold the lock, so the current table cannot flip under them. */
static slot_t *current(const pyshm_sessions_t *t) { return table(t, t->hdr->generation); }

_Static_assert(sizeof(slot_t) == 256, "slot size");

static uint64_t home(const pyshm_sessions_t *t, const uint8_t *id) {
    uint64_t h;
    memcpy(&h, id, 8);       /* ids are random: their first bytes are a hash */
    return h & (t->hdr->n_slots - 1);
}

static void fault(pyshm_sessions_t *t, int point) {
    if (t->fault == point) kill(getpid(), SIGKILL);
}

/* ---- writers' lock, and repair after a writer died holding it ---------------------- */

static void repair(pyshm_sessions_t *t) {
    /* A rehash killed midway wrote only the other table: nothing to undo. */
    uint64_t active = 0, dead = 0;
    slot_t *slots = current(t);
    for (uint64_t i = 0; i < t->hdr->n_slots; i++) {
        slot_t *sl = &slots[i];
        if (sl->seq & 1) sl->seq++;   /* close a half-done update */
        if (sl->state > PYSHM_SESS_DEAD) sl->state = PYSHM_SESS_DEAD;
        active += sl->state == PYSHM_SESS_ACTIVE;
        dead += sl->state == PYSHM_SESS_DEAD;
    }
    t->hdr->active = active;
    t->hdr->tombstones = dead;
    t->hdr->repairs++;
}

static int lock(pyshm_sessions_t *t) {
    int rc = pyshm_lock_acquire(&t->hdr->lock);
    if (rc < 0) return rc;
    if (rc == 1) {
        repair(t);
        pyshm_lock_consistent(&t->hdr->lock);
    }
    return PYSHM_OK;
}

static void unlock(pyshm_sessions_t *t) { pyshm_lock_release(&t->hdr->lock); }

/* Slot changes, bracketed so readers see either the old or the new slot. */
static void begin(slot_t *sl) { __atomic_store_n(&sl->seq, sl->seq + 1, __ATOMIC_RELAXED); __atomic_thread_fence(__ATOMIC_RELEASE); }
static void end(slot_t *sl) { __atomic_store_n(&sl->seq, sl->seq + 1, __ATOMIC_RELEASE); }

/* ---- create / attach ------------------------------------------------------------------ */

int pyshm_sessions_create(const char *name, uint32_t capacity, pyshm_sessions_t **out) {
    if (capacity < 1 || capacity > (1u << 26)) return PYSHM_ERR_TOOSMALL;
    uint64_t n = 16;
    while (n < 2ull * capacity) n <<= 1;
    uint64_t slots_off = 4096;
    pyshm_sessions_t *t = calloc(1, sizeof *t);
    if (!t) return PYSHM_ERR_SYS;
    int rc = pyshm_segment_create(&t->seg, name, slots_off + 2 * n * sizeof(slot_t), PYSHM_KIND_SESSIONS);
    if (rc) { free(t); return rc; }
    t->hdr = (hdr_t *)t->seg.rw;
    t->hdr->version = SESS_VERSION;
    t->hdr->capacity = capacity;
    t->hdr->n_slots = n;
    t->hdr->slots_off = slots_off;
    rc = pyshm_lock_init(&t->hdr->lock);
    if (rc) { pyshm_segment_detach(&t->seg); pyshm_segment_unlink(name); free(t); return rc; }
    __atomic_store_n(&t->hdr->seg.ready, 1, __ATOMIC_RELEASE);
    *out = t;
    return PYSHM_OK;
}

int pyshm_sessions_attach(const char *name, pyshm_sessions_t **out) {
    pyshm_sessions_t *t = calloc(1, sizeof *t);
    if (!t) return PYSHM_ERR_SYS;
    int rc = pyshm_segment_attach(&t->seg, name, PYSHM_KIND_SESSIONS);
    if (rc) { free(t); return rc; }
    hdr_t *h = (hdr_t *)t->seg.rw;
    /* Checked once here; every slot index below is masked with n_slots - 1. */
    if (h->version != SESS_VERSION || !h->n_slots || (h->n_slots & (h->n_slots - 1))
        || h->slots_off < sizeof(hdr_t) || h->slots_off > t->seg.size
        || h->n_slots > (t->seg.size - h->slots_off) / sizeof(slot_t) / 2 || h->capacity > h->n_slots / 2) {
        pyshm_segment_detach(&t->seg);
        free(t);
        return PYSHM_ERR_CORRUPT;
    }
    t->hdr = h;
    *out = t;
    return PYSHM_OK;
}

void pyshm_sessions_detach(pyshm_sessions_t *t) {
    if (!t) return;
    pyshm_segment_detach(&t->seg);
    free(t);
}

void pyshm_sessions_set_fault(pyshm_sessions_t *t, int point) { t->fault = point; }

/* ---- lookups ------------------------------------------------------------------------------- */

/* Under the lock: the slot holding id, or the first free place for it. */
static slot_t *find_locked(pyshm_sessions_t *t, const uint8_t *id, slot_t **free_slot) {
    uint64_t mask = t->hdr->n_slots - 1;
    slot_t *slots = current(t);
    if (free_slot) *free_slot = NULL;
    for (uint64_t i = home(t, id), n = 0; n <= mask; i = (i + 1) & mask, n++) {
        slot_t *sl = &slots[i];
        if (sl->state == PYSHM_SESS_EMPTY) {
            if (free_slot && !*free_slot) *free_slot = sl;
            return NULL;
        }
        if (sl->state == PYSHM_SESS_DEAD) {
            if (free_slot && !*free_slot) *free_slot = sl;
        } else if (!memcmp(sl->s.id, id, 16)) {
            return sl;
        }
    }
    return NULL;
}

/* Takes the lock and finds id's slot; when it is not there, unlocks and
 * returns NULL with *rc set. */
static slot_t *lock_slot(pyshm_sessions_t *t, const uint8_t *id, int *rc) {
    *rc = lock(t);
    if (*rc) return NULL;
    slot_t *sl = find_locked(t, id, NULL);
    if (!sl) {
        unlock(t);
        *rc = PYSHM_ERR_NOTFOUND;
    }
    return sl;
}

int pyshm_sessions_get(pyshm_sessions_t *t, const uint8_t *id, pyshm_session_t *out) {
    uint64_t mask = t->hdr->n_slots - 1;
    for (;;) {
        uint32_t gen = __atomic_load_n(&t->hdr->generation, __ATOMIC_ACQUIRE);
        slot_t *slots = table(t, gen);
        int found = 0, torn = 0;
        for (uint64_t i = home(t, id), n = 0; n <= mask; i = (i + 1) & mask, n++) {
            slot_t *sl = &slots[i];
            uint32_t seq = __atomic_load_n(&sl->seq, __ATOMIC_ACQUIRE);
            if (seq & 1) { torn = 1; break; }
            uint32_t state = sl->state;
            int match = state == PYSHM_SESS_ACTIVE && !memcmp(sl->s.id, id, 16);
            if (match) memcpy(out, &sl->s, sizeof *out);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (__atomic_load_n(&sl->seq, __ATOMIC_RELAXED) != seq) { torn = 1; break; }
            if (match) { found = 1; break; }
            if (state == PYSHM_SESS_EMPTY) break;
        }
        if (torn || __atomic_load_n(&t->hdr->generation, __ATOMIC_ACQUIRE) != gen) {
            sched_yield();   /* a writer was there: look again */
            continue;
        }
        return found ? PYSHM_OK : PYSHM_ERR_NOTFOUND;
    }
}

int pyshm_sessions_brief(pyshm_sessions_t *t, const uint8_t *id, pyshm_session_brief_t *out) {
    pyshm_session_t s;
    int rc = pyshm_sessions_get(t, id, &s);
    if (rc) return rc;
    out->worker = s.worker;
    out->kind = s.kind;
    out->worker_gen = s.worker_gen;
    out->closure_version = s.closure_version;
    out->expires = s.expires;
    out->flags = s.flags;
    out->owner_node = s.owner_node;
    return PYSHM_OK;
}

/* ---- writers ---------------------------------------------------------------------------------- */

/* Too many tombstones make misses slow: copy the live slots into the other
 * table, then flip to it.  Killed midway, the current table is untouched
 * (the half-built one is simply not used).  Readers that straddle the flip
 * see the generation move and start over. */
static void rehash(pyshm_sessions_t *t) {
    uint64_t n = t->hdr->n_slots;
    slot_t *from = current(t), *to = table(t, t->hdr->generation + 1);
    for (uint64_t i = 0; i < n; i++) {
        begin(&to[i]);
        to[i].state = PYSHM_SESS_EMPTY;
        end(&to[i]);
    }
    for (uint64_t i = 0; i < n; i++) {
        if (from[i].state != PYSHM_SESS_ACTIVE) continue;
        uint64_t j = home(t, from[i].s.id);
        while (to[j].state != PYSHM_SESS_EMPTY) j = (j + 1) & (n - 1);
        begin(&to[j]);
        to[j].s = from[i].s;
        to[j].state = PYSHM_SESS_ACTIVE;
        end(&to[j]);
    }
    __atomic_store_n(&t->hdr->generation, t->hdr->generation + 1, __ATOMIC_RELEASE);  /* the flip */
    t->hdr->tombstones = 0;
}

int pyshm_sessions_insert(pyshm_sessions_t *t, const pyshm_session_t *s) {
    int rc = lock(t);
    if (rc) return rc;
    slot_t *free_slot;
    if (find_locked(t, s->id, &free_slot)) rc = PYSHM_ERR_EXISTS;
    else if (t->hdr->active >= t->hdr->capacity || !free_slot) rc = PYSHM_ERR_FULL;
    else {
        begin(free_slot);
        fault(t, PYSHM_SFAULT_CREATE);
        if (free_slot->state == PYSHM_SESS_DEAD) t->hdr->tombstones--;
        free_slot->s = *s;
        free_slot->state = PYSHM_SESS_ACTIVE;
        end(free_slot);
        t->hdr->active++;
    }
    unlock(t);
    return rc;
}

/* The field writers below change only their own fields of the entry, so
 * writers in different processes never undo each other's changes.  Each is
 * bracketed by write_begin (the table's lock, then the slot's sequence
 * made odd) and write_end (even again, then the lock released). */

static slot_t *write_begin(pyshm_sessions_t *t, const uint8_t *id, int *rc) {
    slot_t *sl = lock_slot(t, id, rc);
    if (sl) begin(sl);
    return sl;
}

static int write_end(pyshm_sessions_t *t, slot_t *sl) {
    end(sl);
    unlock(t);
    return PYSHM_OK;
}

int pyshm_sessions_bind(pyshm_sessions_t *t, const uint8_t *id, int32_t worker, uint64_t worker_gen) {
    int rc;
    slot_t *sl = write_begin(t, id, &rc);
    if (!sl) return rc;
    fault(t, PYSHM_SFAULT_UPDATE);
    sl->s.worker = worker;
    sl->s.worker_gen = worker_gen;
    return write_end(t, sl);
}

int pyshm_sessions_touch(pyshm_sessions_t *t, const uint8_t *id, double now, double expires) {
    int rc;
    slot_t *sl = write_begin(t, id, &rc);
    if (!sl) return rc;
    sl->s.last_access = now;
    sl->s.expires = expires;
    return write_end(t, sl);
}

int pyshm_sessions_saved(pyshm_sessions_t *t, const uint8_t *id, const char *closure, uint64_t version,
                         double now, double expires) {
    size_t n = strlen(closure);
    if (n >= sizeof(((pyshm_session_t *)0)->closure)) return PYSHM_ERR_NAME;
    int rc;
    slot_t *sl = write_begin(t, id, &rc);
    if (!sl) return rc;
    fault(t, PYSHM_SFAULT_UPDATE);
    memcpy(sl->s.closure, closure, n + 1);
    sl->s.closure_version = version;
    if (now >= 0) {
        sl->s.last_access = now;
        sl->s.expires = expires;
    }
    return write_end(t, sl);
}

int pyshm_sessions_cluster(pyshm_sessions_t *t, const uint8_t *id, uint32_t owner_node, uint32_t secondary_node,
                           uint64_t repl_seq) {
    int rc;
    slot_t *sl = write_begin(t, id, &rc);
    if (!sl) return rc;
    fault(t, PYSHM_SFAULT_UPDATE);
    sl->s.owner_node = owner_node;
    sl->s.secondary_node = secondary_node;
    sl->s.repl_seq = repl_seq;
    return write_end(t, sl);
}

int pyshm_sessions_flags(pyshm_sessions_t *t, const uint8_t *id, uint32_t set, uint32_t clear) {
    int rc;
    slot_t *sl = write_begin(t, id, &rc);
    if (!sl) return rc;
    fault(t, PYSHM_SFAULT_UPDATE);
    sl->s.flags = (sl->s.flags & ~clear) | set;
    return write_end(t, sl);
}

int pyshm_sessions_remove(pyshm_sessions_t *t, const uint8_t *id) {
    int rc;
    slot_t *sl = lock_slot(t, id, &rc);
    if (!sl) return rc;
    begin(sl);
    fault(t, PYSHM_SFAULT_END);
    sl->state = PYSHM_SESS_DEAD;
    memset(&sl->s, 0, sizeof sl->s);
    end(sl);
    t->hdr->active--;
    t->hdr->tombstones++;
    if (t->hdr->tombstones > t->hdr->n_slots / 4) rehash(t);
    unlock(t);
    return PYSHM_OK;
}

int pyshm_sessions_scan(pyshm_sessions_t *t, double now, int32_t worker, uint8_t *ids, uint32_t cap) {
    int rc = lock(t);
    if (rc) return rc;
    uint32_t n = 0;
    slot_t *slots = current(t);
    for (uint64_t i = 0; i < t->hdr->n_slots && n < cap; i++) {
        slot_t *sl = &slots[i];
        if (sl->state != PYSHM_SESS_ACTIVE) continue;
        if (worker == PYSHM_SCAN_ALL || (worker >= 0 && sl->s.worker == worker)
            || (worker == PYSHM_SCAN_EXPIRED && sl->s.expires > 0 && sl->s.expires <= now))
            memcpy(ids + 16 * n++, sl->s.id, 16);
    }
    unlock(t);
    return (int)n;
}

int pyshm_sessions_stats(pyshm_sessions_t *t, pyshm_sessions_stats_t *out) {
    out->capacity = t->hdr->capacity;
    out->active = __atomic_load_n(&t->hdr->active, __ATOMIC_RELAXED);
    out->tombstones = __atomic_load_n(&t->hdr->tombstones, __ATOMIC_RELAXED);
    out->repairs = __atomic_load_n(&t->hdr->repairs, __ATOMIC_RELAXED);
    return PYSHM_OK;
}

/* Every live slot is reachable from its home slot, none is half-written,
 * and the counts match the slots. */
int pyshm_sessions_check(pyshm_sessions_t *t) {
    int rc = lock(t);
    if (rc) return rc;
    uint64_t active = 0, dead = 0, mask = t->hdr->n_slots - 1;
    slot_t *slots = current(t);
    rc = PYSHM_OK;
    for (uint64_t i = 0; i <= mask && !rc; i++) {
        slot_t *sl = &slots[i];
        if ((sl->seq & 1) || sl->state > PYSHM_SESS_DEAD) rc = PYSHM_ERR_CORRUPT;
        dead += sl->state == PYSHM_SESS_DEAD;
        if (sl->state != PYSHM_SESS_ACTIVE) continue;
        active++;
        for (uint64_t j = home(t, sl->s.id); j != i; j = (j + 1) & mask)
            if (slots[j].state == PYSHM_SESS_EMPTY) { rc = PYSHM_ERR_CORRUPT; break; }
    }
    if (!rc && (active != t->hdr->active || dead != t->hdr->tombstones || active > t->hdr->capacity))
        rc = PYSHM_ERR_CORRUPT;
    unlock(t);
    return rc;
}
