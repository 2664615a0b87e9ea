/* Request/response memory: slots and SPSC rings (see reqmem.h).
 *
 * Locking: none.  Every ring has one producer and one consumer; every slot
 * field is written by the single current owner its state names.  State
 * changes are release stores after the fields they publish; readers load
 * the state with acquire.
 *
 * Trust: a worker maps this segment read-write and may be buggy or killed
 * at any instruction, so any byte of it may be garbage.  The geometry is
 * therefore validated once (layout_ok) and copied into the process-private
 * handle; no bound is ever read from the shared header again.  Every other
 * value read from the segment and used as an index, a position or a length
 * is checked where it is read, each check with the invariant it relies on;
 * a broken one yields PYSHM_ERR_CORRUPT (never a wild access, never a loop
 * longer than a ring).  Blob ids and heap data offsets are not ours to
 * check: the closure heap checks them when they are used (heap.py
 * buffer_at, pyshm_heap_adopt). */
#include "reqmem.h"
#include "proc.h"
#include "pyshm_errors.h"
#include "segment.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RM_VERSION 1u
#define CACHE_LINE 64
#define MAX_SLOTS (1u << 24)
#define MAX_WORKERS 4096u
#define MAX_INLINE (1u << 26)

typedef struct {
    uint64_t head;                         /* consumer's position (consumer writes) */
    uint8_t pad0[CACHE_LINE - 8];
    uint64_t tail;                         /* producer's position (producer writes) */
    uint8_t pad1[CACHE_LINE - 8];
} ring_t;

/* One worker index.  pid/start/gen are written by the manager only. */
typedef struct {
    int64_t pid;
    uint64_t start;
    uint64_t gen;            /* bumped at every bind: a stale worker is refused */
    uint32_t wake;           /* futex word: bumped by the manager to wake take() */
    uint32_t sleeping;       /* 1 while the worker is (about to be) in futex_wait */
    uint8_t pad[CACHE_LINE - 32];
    ring_t req;              /* manager -> worker */
    ring_t done;             /* worker -> manager */
} worker_t;

typedef struct {
    uint32_t state;          /* PYSHM_SLOT_*: release-stored last */
    uint32_t worker;         /* owner while QUEUED/RUNNING/DONE */
    uint64_t gen;            /* the owner's generation */
    uint64_t seq;
    uint32_t flags, peer_len;
    uint64_t req_len, req_blob, req_data;
    uint64_t resp_len, resp_blob, resp_data;
    uint8_t session[16];
    char peer[64];
} slot_t;                    /* followed by inline_size request bytes, then inline_size response bytes */

typedef struct {
    pyshm_seg_header_t seg;
    uint32_t version;
    uint32_t n_slots, n_workers, inline_size;
    uint32_t ring_cap;       /* smallest power of two >= n_slots */
    uint32_t mgr_armed;      /* 1: the manager waits for an eventfd write */
    uint64_t workers_off, cells_off, slots_off, slot_stride;
} rm_hdr_t;

/* Process-private: the geometry is copied here from a header that passed
 * layout_ok (or that this process just wrote), so a later scribble on the
 * shared header cannot move an index outside the segment. */
struct pyshm_reqmem {
    pyshm_segment_t seg;
    rm_hdr_t *hdr;           /* shared: after attach only mgr_armed is used */
    uint32_t n_slots, n_workers, inline_size;
    uint32_t ring_mask;      /* ring_cap - 1 */
    uint64_t slots_off, slot_stride;
    worker_t *workers;       /* n_workers entries, inside the segment */
    uint32_t *cells;         /* 2 * n_workers * ring_cap cells, inside the segment */
};

#define SLOT_HDR 256u  /* slot_t rounded up: payload areas stay 64-byte aligned */

static uint64_t round_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

/* Every caller has checked w < rm->n_workers. */
static worker_t *worker_at(pyshm_reqmem_t *rm, uint32_t w) { return rm->workers + w; }

/* Cells of worker w's ring: req at 2w, done at 2w+1 (w < n_workers). */
static uint32_t *cells(pyshm_reqmem_t *rm, uint32_t w, int done) {
    return rm->cells + (uint64_t)(2 * w + done) * (rm->ring_mask + 1ull);
}

/* Every caller has checked s < rm->n_slots. */
static slot_t *slot_at(pyshm_reqmem_t *rm, uint32_t s) {
    return (slot_t *)(rm->seg.rw + rm->slots_off + (uint64_t)s * rm->slot_stride);
}

/* Where everything lies, given the counts. */
typedef struct {
    uint32_t ring_cap;
    uint64_t workers_off, cells_off, slots_off, slot_stride, size;
} layout_t;

/* The one layout of (n_slots, n_workers, inline_size), inline_size already
 * rounded: header | worker table | cells | slots, page-aligned regions, the
 * segment ending with the last slot.  0 when a count is out of range (the
 * limits keep every product below far from overflowing). */
static int layout_for(uint32_t n_slots, uint32_t n_workers, uint32_t inline_size, layout_t *l) {
    if (!n_slots || n_slots > MAX_SLOTS || !n_workers || n_workers > MAX_WORKERS) return 0;
    if (!inline_size || inline_size % 64 || inline_size > MAX_INLINE) return 0;
    l->ring_cap = 1;
    while (l->ring_cap < n_slots) l->ring_cap <<= 1;   /* smallest power of two >= n_slots */
    l->workers_off = round_up(sizeof(rm_hdr_t), 4096);
    l->cells_off = round_up(l->workers_off + n_workers * sizeof(worker_t), 4096);
    l->slots_off = round_up(l->cells_off + 8ull * n_workers * l->ring_cap, 4096);
    l->slot_stride = SLOT_HDR + 2ull * inline_size;
    l->size = l->slots_off + n_slots * l->slot_stride;
    return 1;
}

/* The header's geometry, checked once at attach.  Invariant: the header
 * holds exactly the layout create computed from its counts, and the
 * segment is exactly that size; so every region lies inside the segment,
 * and a scribbled count or offset is refused unless it happens to describe
 * the same bytes. */
static int layout_ok(const rm_hdr_t *h, uint64_t size) {
    layout_t l;
    return h->version == RM_VERSION && layout_for(h->n_slots, h->n_workers, h->inline_size, &l)
        && h->ring_cap == l.ring_cap && h->workers_off == l.workers_off && h->cells_off == l.cells_off
        && h->slots_off == l.slots_off && h->slot_stride == l.slot_stride && size == l.size;
}

_Static_assert(sizeof(rm_hdr_t) <= PYSHM_SEG_HEADER_SIZE, "an attached segment holds a whole header");

/* Copies the geometry of h (valid: written by create or passed layout_ok)
 * into the private handle. */
static void load_geometry(pyshm_reqmem_t *rm, const rm_hdr_t *h) {
    rm->n_slots = h->n_slots;
    rm->n_workers = h->n_workers;
    rm->inline_size = h->inline_size;
    rm->ring_mask = h->ring_cap - 1;
    rm->slots_off = h->slots_off;
    rm->slot_stride = h->slot_stride;
    rm->workers = (worker_t *)(rm->seg.rw + h->workers_off);
    rm->cells = (uint32_t *)(rm->seg.rw + h->cells_off);
}

int pyshm_rm_create(const char *name, uint32_t n_slots, uint32_t n_workers, uint32_t inline_size,
                    pyshm_reqmem_t **out) {
    if (inline_size > MAX_INLINE) return PYSHM_ERR_TOOSMALL;
    inline_size = (uint32_t)round_up(inline_size ? inline_size : 64, 64);
    layout_t l;
    if (!layout_for(n_slots, n_workers, inline_size, &l)) return PYSHM_ERR_TOOSMALL;
    pyshm_reqmem_t *rm = calloc(1, sizeof *rm);
    if (!rm) return PYSHM_ERR_SYS;
    int rc = pyshm_segment_create(&rm->seg, name, l.size, PYSHM_KIND_REQMEM);
    if (rc) { free(rm); return rc; }
    rm->hdr = (rm_hdr_t *)rm->seg.rw;
    rm->hdr->version = RM_VERSION;
    rm->hdr->n_slots = n_slots;
    rm->hdr->n_workers = n_workers;
    rm->hdr->inline_size = inline_size;
    rm->hdr->ring_cap = l.ring_cap;
    rm->hdr->workers_off = l.workers_off;
    rm->hdr->cells_off = l.cells_off;
    rm->hdr->slots_off = l.slots_off;
    rm->hdr->slot_stride = l.slot_stride;
    load_geometry(rm, rm->hdr);
    /* The file is zero-filled: every slot FREE, every worker unbound. */
    __atomic_store_n(&rm->hdr->seg.ready, 1, __ATOMIC_RELEASE);
    *out = rm;
    return PYSHM_OK;
}

int pyshm_rm_attach(const char *name, pyshm_reqmem_t **out) {
    pyshm_reqmem_t *rm = calloc(1, sizeof *rm);
    if (!rm) return PYSHM_ERR_SYS;
    int rc = pyshm_segment_attach(&rm->seg, name, PYSHM_KIND_REQMEM);
    if (rc) { free(rm); return rc; }
    rm->hdr = (rm_hdr_t *)rm->seg.rw;
    /* Checked and copied from one private snapshot: a concurrent scribble
     * cannot slip in between the check and the copy.  segment attach
     * guarantees PYSHM_SEG_HEADER_SIZE bytes (see the static assert). */
    rm_hdr_t snap;
    memcpy(&snap, rm->hdr, sizeof snap);
    if (!layout_ok(&snap, rm->seg.size)) {
        pyshm_segment_detach(&rm->seg);
        free(rm);
        return PYSHM_ERR_CORRUPT;
    }
    load_geometry(rm, &snap);
    *out = rm;
    return PYSHM_OK;
}

void pyshm_rm_detach(pyshm_reqmem_t *rm) {
    if (!rm) return;
    pyshm_segment_detach(&rm->seg);
    free(rm);
}

uintptr_t pyshm_rm_base(pyshm_reqmem_t *rm) { return (uintptr_t)rm->seg.rw; }
uint64_t pyshm_rm_size(pyshm_reqmem_t *rm) { return rm->seg.size; }
uint32_t pyshm_rm_n_slots(pyshm_reqmem_t *rm) { return rm->n_slots; }
uint32_t pyshm_rm_n_workers(pyshm_reqmem_t *rm) { return rm->n_workers; }
uint32_t pyshm_rm_inline_size(pyshm_reqmem_t *rm) { return rm->inline_size; }

uint64_t pyshm_rm_req_off(pyshm_reqmem_t *rm, uint32_t s) {
    return s < rm->n_slots ? rm->slots_off + s * rm->slot_stride + SLOT_HDR : 0;
}

uint64_t pyshm_rm_resp_off(pyshm_reqmem_t *rm, uint32_t s) {
    return s < rm->n_slots ? pyshm_rm_req_off(rm, s) + rm->inline_size : 0;
}

/* ---- rings ---------------------------------------------------------------- */

/* Producer side: the cell is written before the tail that publishes it.
 * The tail is our own position, but in shared memory: any value is harmless,
 * it is masked before use.  The producer never reads the head, so a req ring
 * can hold more than ring_cap entries: a cancelled entry stays until the
 * worker pops it (pyshm_rm_cancel), and while a worker is stuck in one
 * request the manager may queue to it and withdraw on timeout again and
 * again.  The newest entries then overwrite the oldest; take_one copes.
 * Cells are read and written whole (relaxed atomics): an overwrite races
 * with no torn id. */
static void ring_push(ring_t *r, uint32_t *c, uint32_t mask, uint32_t id) {
    uint64_t t = r->tail;
    __atomic_store_n(&c[t & mask], id, __ATOMIC_RELAXED);
    __atomic_store_n(&r->tail, t + 1, __ATOMIC_RELEASE);
}

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/* ---- slots ------------------------------------------------------------------- */

/* Copies slot s into *out, reading each shared field once.  Invariants kept
 * by submit and complete: an inline payload (blob 0) is at most inline_size
 * bytes, at this slot's own inline area (the offset is computed here, never
 * read); peer_len <= sizeof peer.  A length breaking one is clamped, so the
 * caller's reads stay inside the slot whatever the segment says, and the
 * return is PYSHM_ERR_CORRUPT.  The response is judged only when `done`:
 * before DONE publishes it, a worker may be half-way through writing it.
 * *_data of a blob is a heap offset: the heap checks it. */
static int fill_info(pyshm_reqmem_t *rm, uint32_t slot, const slot_t *s, int done, pyshm_slot_info_t *out) {
    int bad = 0;
    out->slot = slot;
    out->flags = s->flags;
    out->seq = s->seq;
    out->req_len = s->req_len;
    out->req_blob = s->req_blob;
    out->resp_len = s->resp_len;
    out->resp_blob = s->resp_blob;
    memcpy(out->session, s->session, 16);
    out->peer_len = s->peer_len;
    if (out->peer_len > sizeof out->peer) { out->peer_len = sizeof out->peer; bad = 1; }
    memcpy(out->peer, s->peer, out->peer_len);
    out->req_data = out->req_blob ? s->req_data : pyshm_rm_req_off(rm, slot);
    if (!out->req_blob && out->req_len > rm->inline_size) { out->req_len = rm->inline_size; bad = 1; }
    out->resp_data = out->resp_blob ? s->resp_data : pyshm_rm_resp_off(rm, slot);
    if (!out->resp_blob && out->resp_len > rm->inline_size) { out->resp_len = rm->inline_size; bad |= done; }
    return bad ? PYSHM_ERR_CORRUPT : PYSHM_OK;
}

/* 1 when slot id (< n_slots) holds a response of worker w. */
static int done_by(pyshm_reqmem_t *rm, uint32_t id, uint32_t w) {
    slot_t *s = slot_at(rm, id);
    return __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == PYSHM_SLOT_DONE && s->worker == w;
}

/* ---- manager side ------------------------------------------------------------ */

int pyshm_rm_bind_worker(pyshm_reqmem_t *rm, uint32_t w, int64_t pid, uint64_t start, uint64_t *gen) {
    if (w >= rm->n_workers) return PYSHM_ERR_CORRUPT;
    worker_t *wk = worker_at(rm, w);
    /* A fresh pair of empty rings; the previous owner's entries were
     * resolved by the manager (pyshm_rm_slot_info) before it rebinds. */
    wk->req.head = wk->req.tail = 0;
    wk->done.head = wk->done.tail = 0;
    wk->sleeping = 0;
    wk->pid = pid;
    wk->start = start;
    *gen = __atomic_add_fetch(&wk->gen, 1, __ATOMIC_RELEASE);
    return PYSHM_OK;
}

int pyshm_rm_unbind_worker(pyshm_reqmem_t *rm, uint32_t w) {
    if (w >= rm->n_workers) return PYSHM_ERR_CORRUPT;
    worker_t *wk = worker_at(rm, w);
    __atomic_add_fetch(&wk->gen, 1, __ATOMIC_RELEASE);  /* a late complete() is refused */
    wk->pid = 0;
    pyshm_rm_interrupt(rm, w);
    return PYSHM_OK;
}

int pyshm_rm_submit(pyshm_reqmem_t *rm, uint32_t w, uint32_t slot, uint64_t seq, uint64_t req_len,
                    uint64_t req_blob, uint64_t req_data, const uint8_t *session, const char *peer,
                    uint32_t peer_len) {
    if (w >= rm->n_workers || slot >= rm->n_slots) return PYSHM_ERR_CORRUPT;
    if (!req_blob && req_len > rm->inline_size) return PYSHM_ERR_TOOSMALL;
    slot_t *s = slot_at(rm, slot);
    worker_t *wk = worker_at(rm, w);
    s->worker = w;
    s->gen = wk->gen;
    s->seq = seq;
    s->flags = 0;
    s->req_len = req_len;
    s->req_blob = req_blob;
    s->req_data = req_blob ? req_data : pyshm_rm_req_off(rm, slot);
    s->resp_len = s->resp_blob = s->resp_data = 0;
    if (session) memcpy(s->session, session, 16);
    else memset(s->session, 0, 16);
    s->peer_len = peer_len > sizeof s->peer ? sizeof s->peer : peer_len;
    memcpy(s->peer, peer, s->peer_len);
    __atomic_store_n(&s->state, PYSHM_SLOT_QUEUED, __ATOMIC_RELEASE);
    ring_push(&wk->req, cells(rm, w, 0), rm->ring_mask, slot);
    /* Does the worker need waking?  Only if it sleeps (or is about to): the
     * seq_cst pair (tail store above / sleeping load here, sleeping store /
     * tail load in take) guarantees one of the two sides sees the other.
     * The caller wakes it (pyshm_rm_interrupt), once per batch. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&wk->sleeping, __ATOMIC_SEQ_CST) ? 1 : PYSHM_OK;
}

int pyshm_rm_interrupt(pyshm_reqmem_t *rm, uint32_t w) {
    if (w >= rm->n_workers) return PYSHM_ERR_CORRUPT;
    worker_t *wk = worker_at(rm, w);
    __atomic_add_fetch(&wk->wake, 1, __ATOMIC_SEQ_CST);
    futex(&wk->wake, FUTEX_WAKE, INT_MAX, NULL);
    return PYSHM_OK;
}

/* The worker lied about its done ring: drop what is in it (the consumer
 * owns the head) and say so.  The slots its entries named keep their state:
 * the manager finds them with pyshm_rm_slot_info when it retires w. */
static int drop_ring(ring_t *r, uint64_t tail) {
    __atomic_store_n(&r->head, tail, __ATOMIC_RELEASE);
    return PYSHM_ERR_CORRUPT;
}

int pyshm_rm_drain(pyshm_reqmem_t *rm, uint32_t w, uint32_t *out, uint32_t cap) {
    if (w >= rm->n_workers) return PYSHM_ERR_CORRUPT;
    ring_t *r = &worker_at(rm, w)->done;
    uint32_t *c = cells(rm, w, 1);
    uint64_t h = r->head;
    uint64_t t = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    /* Invariant: head <= tail and a done ring holds at most n_slots <=
     * ring_cap entries: complete() pushes a slot only when it is RUNNING,
     * and it runs again only after the manager drained its entry and
     * released it (or answered it without draining, at shutdown or after
     * the worker died, and queues nothing more to that index until a rebind
     * empties the rings).  This also bounds the loop by ring_cap. */
    if (t - h > rm->ring_mask + 1ull) return drop_ring(r, t);
    uint32_t n = 0;
    for (; n < cap && h != t; h++) {
        uint32_t id = __atomic_load_n(&c[h & rm->ring_mask], __ATOMIC_RELAXED);
        /* Invariant: a cell holds a slot id (complete() checked it). */
        if (id >= rm->n_slots) return drop_ring(r, t);
        /* An entry whose slot is no longer DONE by w is stale (the manager
         * answered and released it before draining): skipped. */
        if (done_by(rm, id, w)) out[n++] = id;
    }
    __atomic_store_n(&r->head, h, __ATOMIC_RELEASE);
    return (int)n;
}

void pyshm_rm_arm(pyshm_reqmem_t *rm) {
    __atomic_store_n(&rm->hdr->mgr_armed, 1, __ATOMIC_SEQ_CST);
}

int pyshm_rm_slot_info(pyshm_reqmem_t *rm, uint32_t slot, uint32_t *state, uint32_t *worker,
                       pyshm_slot_info_t *out) {
    if (slot >= rm->n_slots) return PYSHM_ERR_CORRUPT;
    slot_t *s = slot_at(rm, slot);
    uint32_t st = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
    uint32_t wk = s->worker;
    int rc = fill_info(rm, slot, s, st == PYSHM_SLOT_DONE, out);
    *state = st;
    *worker = wk;
    if (st == PYSHM_SLOT_FREE) return PYSHM_OK;  /* the manager's: leftovers, clamped, not judged */
    /* Invariants: the state is a PYSHM_SLOT_*; a slot in use names a worker
     * index (submit checked it). */
    if (st > PYSHM_SLOT_DONE || wk >= rm->n_workers) return PYSHM_ERR_CORRUPT;
    return rc;
}

int pyshm_rm_cancel(pyshm_reqmem_t *rm, uint32_t slot) {
    if (slot >= rm->n_slots) return PYSHM_ERR_CORRUPT;
    /* QUEUED -> FREE unless the worker took it first.  Its ring entry
     * stays; the worker skips it (the state is no longer QUEUED for it). */
    uint32_t queued = PYSHM_SLOT_QUEUED;
    return __atomic_compare_exchange_n(&slot_at(rm, slot)->state, &queued, PYSHM_SLOT_FREE, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

int pyshm_rm_release(pyshm_reqmem_t *rm, uint32_t slot) {
    if (slot >= rm->n_slots) return PYSHM_ERR_CORRUPT;
    __atomic_store_n(&slot_at(rm, slot)->state, PYSHM_SLOT_FREE, __ATOMIC_RELEASE);
    return PYSHM_OK;
}

int pyshm_rm_stats(pyshm_reqmem_t *rm, pyshm_reqmem_stats_t *out) {
    memset(out, 0, sizeof *out);
    out->n_slots = rm->n_slots;
    out->n_workers = rm->n_workers;
    out->inline_size = rm->inline_size;
    for (uint32_t i = 0; i < rm->n_slots; i++) {
        switch (__atomic_load_n(&slot_at(rm, i)->state, __ATOMIC_ACQUIRE)) {
        case PYSHM_SLOT_FREE: out->free++; break;
        case PYSHM_SLOT_QUEUED: out->queued++; break;
        case PYSHM_SLOT_RUNNING: out->running++; break;
        case PYSHM_SLOT_DONE: out->done++; break;
        default: out->corrupt++; break;   /* not a PYSHM_SLOT_*: garbage */
        }
    }
    return PYSHM_OK;
}

/* ---- worker side ---------------------------------------------------------------- */

static int mine(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen) {
    return w < rm->n_workers && __atomic_load_n(&worker_at(rm, w)->gen, __ATOMIC_ACQUIRE) == gen;
}

/* Slot `id` was just popped from w's req ring: 1 when it was QUEUED for
 * (w, gen) and is now RUNNING with *out filled, 0 when the entry is stale
 * (cancelled, or queued to an older generation), PYSHM_ERR_CORRUPT when the
 * entry or its request is garbage. */
static int claim(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, uint32_t id, pyshm_slot_info_t *out) {
    /* Invariant: a cell holds a slot id (submit checked it; cells start 0). */
    if (id >= rm->n_slots) return PYSHM_ERR_CORRUPT;
    slot_t *s = slot_at(rm, id);
    if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != PYSHM_SLOT_QUEUED || s->worker != w || s->gen != gen)
        return 0;
    /* Invariant (submit): an inline request fits the slot, the peer fits
     * peer[].  A request breaking it is refused before it starts: it stays
     * QUEUED and the manager's queue timeout withdraws it. */
    if ((!s->req_blob && s->req_len > rm->inline_size) || s->peer_len > sizeof s->peer)
        return PYSHM_ERR_CORRUPT;
    /* Popped but not yet RUNNING: if we die here the manager finds the
     * slot QUEUED and dispatches it again, which is right: not started.
     * The CAS loses to the manager's cancel (queue timeout). */
    uint32_t queued = PYSHM_SLOT_QUEUED;
    if (!__atomic_compare_exchange_n(&s->state, &queued, PYSHM_SLOT_RUNNING, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        return 0;
    fill_info(rm, id, s, 0, out);  /* clamps anew: the fields checked above were read before the CAS */
    return 1;
}

/* Pops requests until one is claimed: 1 (*out filled), 0 when the ring is
 * empty, or PYSHM_ERR_CORRUPT. */
static int take_one(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, pyshm_slot_info_t *out) {
    ring_t *r = &worker_at(rm, w)->req;
    uint32_t *c = cells(rm, w, 0);
    uint64_t h = r->head;
    uint64_t t = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    /* Invariant: only the newest ring_cap entries are still in the cells.
     * More in [head, tail) means the ring overflowed (see ring_push) or the
     * positions are garbage, which look alike: either way skip to the newest
     * ring_cap.  This bounds the loop by ring_cap.  A QUEUED slot whose entry
     * was overwritten is never taken: the manager's queue timeout withdraws
     * it. */
    if (t - h > rm->ring_mask + 1ull) h = t - (rm->ring_mask + 1ull);
    while (h != t) {
        uint32_t id = __atomic_load_n(&c[h & rm->ring_mask], __ATOMIC_RELAXED);
        __atomic_store_n(&r->head, ++h, __ATOMIC_RELEASE);  /* the head moves after the cell is read */
        int rc = claim(rm, w, gen, id, out);
        if (rc) return rc;
    }
    return 0;
}

int pyshm_rm_take(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, int timeout_ms, pyshm_slot_info_t *out) {
    if (!mine(rm, w, gen)) return PYSHM_ERR_STATE;
    int got = take_one(rm, w, gen, out);
    if (got || timeout_ms <= 0) return got;
    worker_t *wk = worker_at(rm, w);
    uint32_t seen = __atomic_load_n(&wk->wake, __ATOMIC_SEQ_CST);
    __atomic_store_n(&wk->sleeping, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    got = take_one(rm, w, gen, out);  /* re-check after announcing sleep */
    if (!got && mine(rm, w, gen)) {
        struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
        futex(&wk->wake, FUTEX_WAIT, seen, &ts);
        got = take_one(rm, w, gen, out);
    }
    __atomic_store_n(&wk->sleeping, 0, __ATOMIC_SEQ_CST);
    return got;
}

int pyshm_rm_complete(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, uint32_t slot, uint64_t resp_len,
                      uint64_t resp_blob, uint64_t resp_data, uint32_t flags, int wake_fd) {
    if (!mine(rm, w, gen)) return PYSHM_ERR_STATE;
    if (slot >= rm->n_slots) return PYSHM_ERR_CORRUPT;
    if (!resp_blob && resp_len > rm->inline_size) return PYSHM_ERR_TOOSMALL;
    slot_t *s = slot_at(rm, slot);
    /* Ours only when claim() made it RUNNING for (w, gen). */
    if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != PYSHM_SLOT_RUNNING || s->worker != w || s->gen != gen)
        return PYSHM_ERR_STATE;
    s->resp_len = resp_len;
    s->resp_blob = resp_blob;
    s->resp_data = resp_data;
    s->flags = flags;
    __atomic_store_n(&s->state, PYSHM_SLOT_DONE, __ATOMIC_RELEASE);
    ring_push(&worker_at(rm, w)->done, cells(rm, w, 1), rm->ring_mask, slot);
    /* Wake the manager only when it armed: one eventfd write per batch. */
    if (__atomic_exchange_n(&rm->hdr->mgr_armed, 0, __ATOMIC_SEQ_CST) && wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t n = write(wake_fd, &one, sizeof one);
        (void)n;  /* EAGAIN means the counter is already nonzero: awake */
    }
    return PYSHM_OK;
}
