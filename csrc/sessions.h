/* The session table: one fixed-size entry per live session, in its own
 * segment (/pyshm.<instance>.sessions).  Flow state only, never payload.
 *
 * Layout: header | two tables of slots (open addressing by id, linear
 * probing; never more than half full).  One is current; a rehash (when
 * tombstones pile up) fills the other and flips.
 *
 * Concurrency: writers (create, the field writers, end) take one robust
 * process-shared lock.  Readers take no lock: each slot has a sequence
 * number, odd while a writer changes it; a reader copies the slot and
 * retries if the number moved.  A table-wide generation moves when a rehash flips tables, and a
 * lookup that saw it move starts over.
 *
 * Crash safety: a writer killed mid-update leaves the lock owner-dead; the
 * next writer repairs: every odd slot is closed (even again), and counts are
 * recomputed from the slots. */
#ifndef PYSHM_SESSIONS_H
#define PYSHM_SESSIONS_H
#include <stdint.h>

enum { PYSHM_KIND_SESSIONS = 3 };
enum { PYSHM_SESS_EMPTY = 0, PYSHM_SESS_ACTIVE = 1, PYSHM_SESS_DEAD = 2 };  /* DEAD: a tombstone */
enum { PYSHM_SESS_DISTRIBUTED = 1, PYSHM_SESS_REQUEST = 2 };                 /* kinds */

typedef struct pyshm_sessions pyshm_sessions_t;

/* A session entry as callers see it. */
typedef struct {
    uint8_t id[16];          /* 128 bits from the OS CSPRNG */
    uint32_t kind;
    uint32_t suite;
    int32_t worker;          /* bound worker index, -1 when none */
    uint32_t owner_node, secondary_node;
    uint32_t flags;
    uint64_t worker_gen;
    double created, last_access, expires;   /* seconds since the epoch */
    uint64_t closure_version;
    uint64_t repl_seq;
    char closure[48];        /* name of the state closure in the heap, "" when none */
} pyshm_session_t;

typedef struct {
    uint64_t capacity, active, tombstones, repairs;
} pyshm_sessions_stats_t;

/* Fault points for the crash tests: SIGKILL there when set. */
enum { PYSHM_SFAULT_NONE = 0, PYSHM_SFAULT_CREATE = 1, PYSHM_SFAULT_UPDATE = 2, PYSHM_SFAULT_END = 3 };

int pyshm_sessions_create(const char *name, uint32_t capacity, pyshm_sessions_t **out);
int pyshm_sessions_attach(const char *name, pyshm_sessions_t **out);
void pyshm_sessions_detach(pyshm_sessions_t *t);

/* Create fails with PYSHM_ERR_FULL when `capacity` sessions are live and
 * PYSHM_ERR_EXISTS for an id already there. */
int pyshm_sessions_insert(pyshm_sessions_t *t, const pyshm_session_t *s);
int pyshm_sessions_get(pyshm_sessions_t *t, const uint8_t *id, pyshm_session_t *out);   /* lock-free */
/* The hot paths' lookup (routing, HTTP session load): a few numbers, lock-free. */
typedef struct {
    int32_t worker;
    uint32_t kind;
    uint64_t worker_gen, closure_version;
    double expires;
    uint32_t flags, owner_node;
} pyshm_session_brief_t;
int pyshm_sessions_brief(pyshm_sessions_t *t, const uint8_t *id, pyshm_session_brief_t *out);
/* Writers of an entry's fields: each changes only its own fields, in one
 * locked step, so writers from different processes never undo each other's
 * changes.  Each returns PYSHM_ERR_NOTFOUND for an id not there. */
/* Bound to worker `worker` (-1: none) of generation `worker_gen`. */
int pyshm_sessions_bind(pyshm_sessions_t *t, const uint8_t *id, int32_t worker, uint64_t worker_gen);
/* An access at `now`; the session expires at `expires` (0: never). */
int pyshm_sessions_touch(pyshm_sessions_t *t, const uint8_t *id, double now, double expires);
/* The session's state was saved as version `version` of closure `closure`;
 * with now >= 0 that was also an access (as touch), with now < 0 the times
 * are left as they are. */
int pyshm_sessions_saved(pyshm_sessions_t *t, const uint8_t *id, const char *closure, uint64_t version,
                         double now, double expires);
/* The cluster's fields: the node owning the session, the node holding its
 * replica, and the sequence number of the last change replicated. */
int pyshm_sessions_cluster(pyshm_sessions_t *t, const uint8_t *id, uint32_t owner_node, uint32_t secondary_node,
                           uint64_t repl_seq);
/* The entry's flags: the bits in `clear` cleared, then those in `set` set. */
int pyshm_sessions_flags(pyshm_sessions_t *t, const uint8_t *id, uint32_t set, uint32_t clear);
/* Session flags. */
enum { PYSHM_SESSF_MOVED = 1,       /* handed to this node by another: its cookie still names the old owner */
       PYSHM_SESSF_RESUMABLE = 2 };  /* a token was given for it: it outlives its connection (session_ttl) */
int pyshm_sessions_remove(pyshm_sessions_t *t, const uint8_t *id);
/* Ids (up to cap) of the sessions bound to worker `worker` (>= 0), expired
 * at `now` (PYSHM_SCAN_EXPIRED) or all (PYSHM_SCAN_ALL). */
enum { PYSHM_SCAN_EXPIRED = -1, PYSHM_SCAN_ALL = -2 };
int pyshm_sessions_scan(pyshm_sessions_t *t, double now, int32_t worker, uint8_t *ids, uint32_t cap);
int pyshm_sessions_stats(pyshm_sessions_t *t, pyshm_sessions_stats_t *out);
int pyshm_sessions_check(pyshm_sessions_t *t);   /* 0, or PYSHM_ERR_CORRUPT */
void pyshm_sessions_set_fault(pyshm_sessions_t *t, int point);

#endif
