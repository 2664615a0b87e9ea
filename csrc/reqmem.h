/* Request/response memory: the segment between the connection manager and
 * the workers of one instance.
 *
 *   header | worker table (n_workers entries) | ring cells | slots
 *
 * A slot carries one request and, later, its response: inline up to
 * inline_size bytes each, larger payloads in a closure-heap blob whose
 * offset the slot records.  Each worker has two single-producer
 * single-consumer rings of slot ids: `req` (manager -> worker) and `done`
 * (worker -> manager).  SPSC rings need no lock, and a process killed at any
 * instruction leaves them consistent: an entry exists once the producer's
 * tail store is visible, never half.
 *
 * Who owns a slot is told by its state:
 *   FREE     the manager's (its free list)
 *   QUEUED   pushed on worker w's req ring, not yet taken
 *   RUNNING  worker w took it and runs the application
 *   DONE     worker w wrote the response; pushed (or about to be) on done
 * so after worker w died, the manager finds each of its slots' fate:
 * QUEUED -> dispatch again (not started), RUNNING -> error response,
 * DONE -> deliver the response.
 *
 * Any process may also scribble on the segment (a worker maps it
 * read-write).  The geometry is checked at attach and kept in the private
 * handle; every other index, position or length read from the segment is
 * checked before use, and garbage yields PYSHM_ERR_CORRUPT, never an access
 * outside the segment or an unbounded loop.  A worker whose ring or slots
 * fail a check is to be treated as dead: retire it (unbind) and resolve its
 * slots by state, as above. */
#ifndef PYSHM_REQMEM_H
#define PYSHM_REQMEM_H
#include <stdint.h>

enum { PYSHM_KIND_REQMEM = 2 };
enum { PYSHM_SLOT_FREE = 0, PYSHM_SLOT_QUEUED = 1, PYSHM_SLOT_RUNNING = 2, PYSHM_SLOT_DONE = 3 };
enum { PYSHM_RESP_ERROR = 1,        /* response flag: the body is an error message */
       PYSHM_RESP_UNAVAILABLE = 2 }; /* with ERROR: the server cannot take it now (503) */

typedef struct pyshm_reqmem pyshm_reqmem_t;

/* What a worker learns when it takes a request, and what the manager reads
 * back with the response. */
typedef struct {
    uint32_t slot;
    uint32_t flags;
    uint64_t seq;            /* the manager's request number */
    /* *_data: offset of the bytes, in this segment when *_blob is 0, else
     * in the closure heap (the blob holds the payload). */
    uint64_t req_len, req_blob, req_data;
    uint64_t resp_len, resp_blob, resp_data;
    uint8_t session[16];
    uint32_t peer_len;
    char peer[64];
} pyshm_slot_info_t;

typedef struct {
    uint64_t n_slots, n_workers, inline_size;
    uint64_t free, queued, running, done;     /* slots by state */
    uint64_t corrupt;                         /* slots whose state is none of those */
} pyshm_reqmem_stats_t;

int pyshm_rm_create(const char *name, uint32_t n_slots, uint32_t n_workers, uint32_t inline_size,
                    pyshm_reqmem_t **out);
int pyshm_rm_attach(const char *name, pyshm_reqmem_t **out);
void pyshm_rm_detach(pyshm_reqmem_t *rm);
uintptr_t pyshm_rm_base(pyshm_reqmem_t *rm);
uint64_t pyshm_rm_size(pyshm_reqmem_t *rm);
uint32_t pyshm_rm_n_slots(pyshm_reqmem_t *rm);
uint32_t pyshm_rm_n_workers(pyshm_reqmem_t *rm);
uint32_t pyshm_rm_inline_size(pyshm_reqmem_t *rm);
uint64_t pyshm_rm_req_off(pyshm_reqmem_t *rm, uint32_t slot);   /* inline request bytes */
uint64_t pyshm_rm_resp_off(pyshm_reqmem_t *rm, uint32_t slot);  /* inline response bytes */

/* Manager side. */
int pyshm_rm_bind_worker(pyshm_reqmem_t *rm, uint32_t w, int64_t pid, uint64_t start, uint64_t *gen);
int pyshm_rm_unbind_worker(pyshm_reqmem_t *rm, uint32_t w);
/* req_blob/req_data: 0, or a heap blob and the heap offset of its data
 * when the request did not fit inline.  Returns 1 when worker w sleeps and
 * must be woken with pyshm_rm_interrupt (after a batch of submits), else 0. */
int pyshm_rm_submit(pyshm_reqmem_t *rm, uint32_t w, uint32_t slot, uint64_t seq, uint64_t req_len,
                    uint64_t req_blob, uint64_t req_data, const uint8_t *session, const char *peer,
                    uint32_t peer_len);
/* Up to cap slots DONE by worker w, from its completion ring; stale entries
 * are skipped.  PYSHM_ERR_CORRUPT: the ring held garbage; its entries are
 * dropped (retire w: its DONE slots are found by pyshm_rm_slot_info). */
int pyshm_rm_drain(pyshm_reqmem_t *rm, uint32_t w, uint32_t *out, uint32_t cap);
void pyshm_rm_arm(pyshm_reqmem_t *rm);
/* *out always stays inside the segment (inline lengths clamped).
 * PYSHM_ERR_CORRUPT: the slot is in use but its state, worker or lengths
 * are garbage (*state, *worker and *out are still filled). */
int pyshm_rm_slot_info(pyshm_reqmem_t *rm, uint32_t slot, uint32_t *state, uint32_t *worker,
                       pyshm_slot_info_t *out);
int pyshm_rm_cancel(pyshm_reqmem_t *rm, uint32_t slot);  /* 1: cancelled before it started */
int pyshm_rm_release(pyshm_reqmem_t *rm, uint32_t slot);
int pyshm_rm_stats(pyshm_reqmem_t *rm, pyshm_reqmem_stats_t *out);

/* Worker side.  take() waits up to timeout_ms (futex) when the ring is
 * empty; returns 1 with *out filled, 0 on timeout, or an error
 * (PYSHM_ERR_STATE: w was rebound; PYSHM_ERR_CORRUPT: a ring entry or a
 * request was garbage, and was not started).
 * complete() writes eventfd `wake_fd` only when the manager armed it. */
int pyshm_rm_take(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, int timeout_ms, pyshm_slot_info_t *out);
int pyshm_rm_complete(pyshm_reqmem_t *rm, uint32_t w, uint64_t gen, uint32_t slot, uint64_t resp_len,
                      uint64_t resp_blob, uint64_t resp_data, uint32_t flags, int wake_fd);
int pyshm_rm_interrupt(pyshm_reqmem_t *rm, uint32_t w);  /* wake worker w's take() */

#endif
