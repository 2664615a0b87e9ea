/* Request/response memory: slots and SPSC rings (see reqmem.h).
 *
 * Locking: none.  Every ring has one producer and one consumer; every slot
 * field is written by the single current owner its state names.  State
 * changes are release stores after the fields they publish; readers load
 * the state with acquire. */
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
    uint32_t ring_cap;       /* power of two >= n_slots: a ring can never overflow */
    uint32_t mgr_armed;      /* 1: the manager waits for an eventfd write */
    uint64_t workers_off, cells_off, slots_off, slot_stride;
} rm_hdr_t;

struct pyshm_reqmem {
    pyshm_segment_t seg;
    rm_hdr_t *hdr;
};

#define SLOT_HDR 256u  /* slot_t rounded up: payload areas stay 64-byte aligned */

static uint64_t round_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

static worker_t *worker_at(pyshm_reqmem_t *rm, uint32_t w) {
    return (worker_t *)(rm->seg.rw + rm->hdr->workers_off) + w;
}

/* Cells of worker w's ring: req at 2w, done at 2w+1. */
static uint32_t *cells(pyshm_reqmem_t *rm, uint32_t w, int done) {
    return (uint32_t *)(rm->seg.rw + rm->hdr->cells_off) + (uint64_t)(2 * w + done) * rm->hdr->ring_cap;
}

static slot_t *slot_at(pyshm_reqmem_t *rm, uint32_t s) {
    return (slot_t *)(rm->seg.rw + rm->hdr->slots_off + (uint64_t)s * rm->hdr->slot_stride);
}

/* Header fields are checked once at attach, so every index below only needs
 * comparing with n_slots / n_workers. */
static int layout_ok(const rm_hdr_t *h, uint64_t size) {
    if (h->version != RM_VERSION || !h->n_slots || !h->n_workers || h->inline_size % 64) return 0;
    if (h->ring_cap < h->n_slots || (h->ring_cap & (h->ring_cap - 1))) return 0;
    if (h->slot_stride != SLOT_HDR + 2ull * h->inline_size) return 0;
    if (h->workers_off < sizeof(rm_hdr_t) || h->cells_off < h->workers_off + h->n_workers * sizeof(worker_t))
        return 0;
    if (h->slots_off < h->cells_off + 8ull * h->n_workers * h->ring_cap) return 0;
    return h->slots_off <= size && (uint64_t)h->n_slots * h->slot_stride <= size - h->slots_off;
}

int pyshm_rm_create(const char *name, uint32_t n_slots, uint32_t n_workers, uint32_t inline_size,
                    pyshm_reqmem_t **out) {
    if (!n_slots || !n_workers || n_slots > (1u << 24) || n_workers > 4096 || inline_size > (1u << 26))
        return PYSHM_ERR_TOOSMALL;
    inline_size = (uint32_t)round_up(inline_size ? inline_size : 64, 64);
    uint32_t cap = 1;
    while (cap < n_slots) cap <<= 1;
    uint64_t workers_off = round_up(sizeof(rm_hdr_t), 4096);
    uint64_t cells_off = round_up(workers_off + n_workers * sizeof(worker_t), 4096);
    uint64_t slots_off = round_up(cells_off + 8ull * n_workers * cap, 4096);
    uint64_t stride = SLOT_HDR + 2ull * inline_size;
    pyshm_reqmem_t *rm = calloc(1, sizeof *rm);
    if (!rm) return PYSHM_ERR_SYS;
    int rc = pyshm_segment_create(&rm->seg, name, slots_off + n_slots * stride, PYSHM_KIND_REQMEM);
    if (rc) { free(rm); return rc; }
    rm->hdr = (rm_hdr_t *)rm->seg.rw;
    rm->hdr->version = RM_VERSION;
    rm->hdr->n_slots = n_slots;
    rm->hdr->n_workers = n_workers;
    rm->hdr->inline_size = inline_size;
    rm->hdr->ring_cap = cap;
    rm->hdr->workers_off = workers_off;
    rm->hdr->cells_off = cells_off;
    rm->hdr->slots_off = slots_off;
    rm->hdr->slot_stride = stride;
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
    if (!layout_ok(rm->hdr, rm->seg.size)) {
        pyshm_segment_detach(&rm->seg);
        free(rm);
        return PYSHM_ERR_CORRUPT;
    }
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
uint32_t pyshm_rm_n_slots(pyshm_reqmem_t *rm) { return rm->hdr->n_slots; }
uint32_t pyshm_rm_n_workers(pyshm_reqmem_t *rm) { return rm->hdr->n_workers; }
uint32_t pyshm_rm_inline_size(pyshm_reqmem_t *rm) { return rm->hdr->inline_size; }

uint64_t pyshm_rm_req_off(pyshm_reqmem_t *rm, uint32_t s) {
    return s < rm->hdr->n_slots ? rm->hdr->slots_off + s * rm->hdr->slot_stride + SLOT_HDR : 0;
}

uint64_t pyshm_rm_resp_off(pyshm_reqmem_t *rm, uint32_t s) {
    return s < rm->hdr->n_slots ? pyshm_rm_req_off(rm, s) + rm->hdr->inline_size : 0;
}

/* ---- rings ---------------------------------------------------------------- */

/* Producer side: the cell is written before the tail that publishes it. */
static void ring_push(pyshm_reqmem_t *rm, uint32_t w, int done, uint32_t id) {
    ring_t *r = done ? &worker_at(rm, w)->done : &worker_at(rm, w)->req;
    uint64_t t = r->tail;
    cells(rm, w, done)[t & (rm->hdr->ring_cap - 1)] = id;
    __atomic_store_n(&r->tail, t + 1, __ATOMIC_RELEASE);
}

/* Consumer side: returns 1 and the next id, or 0 when empty.  The head moves
 * after the cell is read. */
static int ring_pop(pyshm_reqmem_t *rm, uint32_t w, int done, uint32_t *id) {
    ring_t *r = done ? &worker_at(rm, w)->done : &worker_at(rm, w)->req;
    uint64_t h = r->head;
    if (h == __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE)) return 0;
    *id = cells(rm, w, done)[h & (rm->hdr->ring_cap - 1)];
    __atomic_store_n(&r->head, h + 1, __ATOMIC_RELEASE);
    return 1;
}

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/* ---- manager side ------------------------------------------------------------ */

int pyshm_rm_bind_worker(pyshm_reqmem_t *rm, uint32_t w, int64_t pid, uint64_t start, uint64_t *gen) {
    if (w >= rm->hdr->n_workers) return PYSHM_ERR_CORRUPT;
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
    if (w >= rm->hdr->n_workers) return PYSHM_ERR_CORRUPT;
    worker_t *wk = worker_at(rm, w);
    __atomic_add_fetch(&wk->gen, 1, __ATOMIC_RELEASE);  /* a late complete() is refused */
    wk->pid = 0;
    pyshm_rm_interrupt(rm, w);
    return PYSHM_OK;
}

int pyshm_rm_submit(pyshm_reqmem_t *rm, uint32_t w, uint32_t slot, uint64_t seq, uint64_t req_len,
                    uint64_t req_blob, uint64_t req_data, const uint8_t *session, const char *peer,
                    uint32_t peer_len) {
    if (w >= rm->hdr->n_workers || slot >= rm->hdr->n_slots) return PYSHM_ERR_CORRUPT;
    if (!req_blob && req_len > rm->hdr->inline_size) return PYSHM_ERR_TOOSMALL;
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
    ring_push(rm, w, 0, slot);
    /* Does the worker need waking?  Only if it sleeps (or is about to): the
     * seq_cst pair (tail store above / sleeping load here, sleeping store /
     * tail load in take) guarantees one of the two sides sees the other.
     * The caller wakes it (pyshm_rm_interrupt), once per batch. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(&wk->sleeping, __ATOMIC_SEQ_CST) ? 1 : PYSHM_OK;
}

int pyshm_rm_interrupt(pyshm_reqmem_t *rm, uint32_t w) {
    if (w >= rm->hdr->n_workers) return PYSHM_ERR_CORRUPT;
    worker_t *wk = worker_at(rm, w);
    __atomic_add_fetch(&wk->wake, 1, __ATOMIC_SEQ_CST);
    futex(&wk->wake, FUTEX_WAKE, INT_MAX, NULL);
    return PYSHM_OK;
}

int pyshm_rm_drain(pyshm_reqmem_t *rm, uint32_t w, uint32_t *out, uint32_t cap) {
    if (w >= rm->hdr->n_workers) return PYSHM_ERR_CORRUPT;
    uint32_t n = 0;
    while (n < cap && ring_pop(rm, w, 1, &out[n])) {
        if (out[n] < rm->hdr->n_slots) n++;  /* a corrupt id is dropped, never used */
    }
    return (int)n;
}

void pyshm_rm_arm(pyshm_reqmem_t *rm) {
    __atomic_store_n(&rm->hdr->mgr_armed, 1, __ATOMIC_SEQ_CST);
}

static void fill_info(pyshm_reqmem_t *rm, uint32_t slot, const slot_t *s, pyshm_slot_info_t *out) {
    out->slot = slot;
    out->flags = s->flags;
    out->seq = s->seq;
    out->req_len = s->req_len;
    out->req_blob = s->req_blob;
    out->req_data = s->req_blob ? s->req_data : pyshm_rm_req_off(rm, slot);
    out->resp_len = s->resp_len;
    out->resp_blob = s->resp_blob;
    out->resp_data = s->resp_blob ? s->resp_data : pyshm_rm_resp_off(rm, slot);
    memcpy(out->session, s->session, 16);
    out->peer_len = s->peer_len > sizeof s->peer ? sizeof s->peer : s->peer_len;
    memcpy(out->peer, s->peer, out->peer_len);
}

int pyshm_rm_slot_info(pyshm_reqmem_t *rm, uint32_t slot, uint32_t *state, uint32_t *worker,
                       pyshm_slot_info_t *out) {
    if (slot >= rm->hdr->n_slots) return PYSHM_ERR_CORRUPT;
    slot_t *s = slot_at(rm, slot);
    *state = __atomic_load_n(&s->state, __ATOMIC_ACQUIRE);
    *worker = s->worker;
    fill_info(rm, slot, s, out);
    /* Inline lengths come from another process: clamp what the caller reads. */
    if (!out->req_blob && out->req_len > rm->hdr->inline_size) out->req_len = rm->hdr->inline_size;
    if (!out->resp_blob && out->resp_len > rm->hdr->inline_size) out->resp_len = rm->hdr->inline_size;
    return PYSHM_OK;
}

int pyshm_rm_cancel(pyshm_reqmem_t *rm, uint32_t slot) {
    if (slot >= rm->hdr->n_slots) return PYSHM_ERR_CORRUPT;
    /* QUEUED -> FREE unless the worker took it first.  Its ring entry
     * stays; the worker skips it (the state is no longer QUEUED for it). */
    uint32_t queued = PYSHM_SLOT_QUEUED;
    return __atomic_compare_exchange_n(&slot_at(rm, slot)->state, &queued, PYSHM_SLOT_FREE, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

int pyshm_rm_release(pyshm_reqmem_t *rm, uint32_t slot) {
    if (slot >= rm->hdr->n_slots) return PYSHM_ERR_CORRUPT;
    __atomic_store_n(&slot_at(rm, slot)->state, PYSHM_SLOT_FREE, __ATOMIC_RELEASE);
    return PYSHM_OK;
}

int pyshm_rm_stats(pyshm_reqmem_t *rm, pyshm_reqmem_stats_t *out) {
    memset(out, 0, sizeof *out);
    out->n_slots = rm->hdr->n_slots;
    out->n_workers = rm->hdr->n_workers;
    out->inline_size = rm->hdr->inline_size;
    for (uint32_t i = 0; i < rm->hdr->n_slots; i++) {
        switch (__atomic_load_n(&slot_at(rm, i)->state, __ATOMIC_ACQUIRE)) {
        case PYSHM_SLOT_FREE: out->free++; break;
        case PYSHM_SLOT_QUEUED: out->queued++; break;
        case PYSHM_SLOT_RUNNING: out->running++; break;
        default: out->done++; break;
        }
    }
    return PYSHM_OK;
}

/* ---- worker side ---------------------------------------------------------------- */

static int mine(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen) {
    return w < rm->hdr->n_workers && __atomic_load_n(&worker_at(rm, w)->gen, __ATOMIC_ACQUIRE) == gen;
}

/* Pops the next request; it becomes RUNNING.  A popped id whose slot is not
 * QUEUED for this worker (a corrupt or stale entry) is skipped. */
static int take_one(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, pyshm_slot_info_t *out) {
    uint32_t id;
    while (ring_pop(rm, w, 0, &id)) {
        if (id >= rm->hdr->n_slots) continue;
        slot_t *s = slot_at(rm, id);
        if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != PYSHM_SLOT_QUEUED || s->worker != w
            || s->gen != gen)
            continue;
        /* Popped but not yet RUNNING: if we die here the manager finds the
         * slot QUEUED and dispatches it again, which is right: not started.
         * The CAS loses to the manager's cancel (queue timeout). */
        uint32_t queued = PYSHM_SLOT_QUEUED;
        if (!__atomic_compare_exchange_n(&s->state, &queued, PYSHM_SLOT_RUNNING, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        fill_info(rm, id, s, out);
        if (!out->req_blob && out->req_len > rm->hdr->inline_size) out->req_len = rm->hdr->inline_size;
        return 1;
    }
    return 0;
}

int pyshm_rm_take(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, int timeout_ms, pyshm_slot_info_t *out) {
    if (!mine(rm, w, gen)) return PYSHM_ERR_STATE;
    if (take_one(rm, w, gen, out)) return 1;
    if (timeout_ms <= 0) return 0;
    worker_t *wk = worker_at(rm, w);
    uint32_t seen = __atomic_load_n(&wk->wake, __ATOMIC_SEQ_CST);
    __atomic_store_n(&wk->sleeping, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int got = take_one(rm, w, gen, out);  /* re-check after announcing sleep */
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
    if (slot >= rm->hdr->n_slots) return PYSHM_ERR_CORRUPT;
    if (!resp_blob && resp_len > rm->hdr->inline_size) return PYSHM_ERR_TOOSMALL;
    slot_t *s = slot_at(rm, slot);
    if (__atomic_load_n(&s->state, __ATOMIC_ACQUIRE) != PYSHM_SLOT_RUNNING || s->worker != w)
        return PYSHM_ERR_STATE;
    s->resp_len = resp_len;
    s->resp_blob = resp_blob;
    s->resp_data = resp_data;
    s->flags = flags;
    __atomic_store_n(&s->state, PYSHM_SLOT_DONE, __ATOMIC_RELEASE);
    ring_push(rm, w, 1, slot);
    /* Wake the manager only when it armed: one eventfd write per batch. */
    if (__atomic_exchange_n(&rm->hdr->mgr_armed, 0, __ATOMIC_SEQ_CST) && wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t n = write(wake_fd, &one, sizeof one);
        (void)n;  /* EAGAIN means the counter is already nonzero: awake */
    }
    return PYSHM_OK;
}
