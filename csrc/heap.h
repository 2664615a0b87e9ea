/* The shared closure heap: named, versioned blobs in one segment.
 *
 * A put is alloc (blob BUILDING, owned by the caller) -> the caller writes
 * the encoded closure at pyshm_heap_data(off) -> publish (the blob becomes
 * the name's current version; the old one is freed once unpinned).
 * A map is pin (the current version, recorded in this process's reader
 * slot) ... unpin.  Every call takes and releases the heap lock. */
#ifndef PYSHM_HEAP_H
#define PYSHM_HEAP_H
#include <stdint.h>
#include <stddef.h>

typedef struct pyshm_heap pyshm_heap_t;

typedef struct {
    uint64_t blob;      /* offset of the pinned block */
    uint64_t data;      /* offset of its encoded data */
    uint64_t length;    /* bytes of encoded data */
    uint64_t version;
} pyshm_pin_info_t;

typedef struct {
    uint64_t size;          /* segment bytes (a ceiling: pages cost once touched) */
    uint64_t arena_bytes;   /* bytes the allocator manages */
    uint64_t used_bytes;    /* bytes in used blocks */
    uint64_t largest_free;  /* largest blob that fits now */
    uint64_t n_names;
    uint64_t n_active, n_obsolete, n_building; /* blobs by state */
    uint64_t n_pinned;      /* blobs with at least one pin */
    uint64_t n_readers;     /* attached live processes */
    uint64_t reader_capacity, name_capacity;
    uint64_t n_repairs;
} pyshm_heap_stats_t;

typedef struct {
    uint64_t readers;       /* dead processes whose pins were released */
    uint64_t blobs;         /* blobs freed */
} pyshm_reclaim_t;

/* Fault-injection points for the crash tests: the process SIGKILLs itself
 * there when pyshm_heap_set_fault named that point. */
enum {
    PYSHM_FAULT_NONE = 0,
    PYSHM_FAULT_ALLOC_SPLIT,   /* lock held, block half split */
    PYSHM_FAULT_ALLOC_USED,    /* lock held, block used, no blob header yet */
    PYSHM_FAULT_ENCODE,        /* lock free, blob BUILDING, data half written */
    PYSHM_FAULT_PUBLISH_DIR,   /* lock held, directory points at the new blob */
    PYSHM_FAULT_PUBLISH_OLD,   /* lock held, old version obsolete, not freed */
    PYSHM_FAULT_FREE_MERGE,    /* lock held, free block half merged */
    PYSHM_FAULT_PIN,           /* lock held, pin counted in the slot only */
    PYSHM_FAULT_UNPIN,         /* lock held, unpin counted in the slot only */
    PYSHM_FAULT_DIR_INSERT,    /* lock held, new directory entry half written */
    PYSHM_FAULT_COUNT
};

enum { PYSHM_ATTACH_OBSERVE = 1 }; /* attach without a reader slot */

int pyshm_heap_create(const char *name, uint64_t size, uint64_t names, uint64_t readers,
                      pyshm_heap_t **out);
int pyshm_heap_attach(const char *name, int flags, pyshm_heap_t **out);
void pyshm_heap_detach(pyshm_heap_t *h);
int pyshm_heap_rebind(pyshm_heap_t *h);  /* in a forked child: a slot of its own */

uintptr_t pyshm_heap_ro_base(pyshm_heap_t *h);
uintptr_t pyshm_heap_rw_base(pyshm_heap_t *h);
int64_t pyshm_heap_slot(pyshm_heap_t *h);

int pyshm_heap_alloc(pyshm_heap_t *h, uint64_t length, pyshm_pin_info_t *out);
int pyshm_heap_abandon(pyshm_heap_t *h, uint64_t blob);
/* Takes over a BUILDING blob from the live or dead process (pid, start)
 * that allocated it: its memory is then freed with this process, not that
 * one (a worker hands a large response to the manager this way). */
int pyshm_heap_adopt(pyshm_heap_t *h, uint64_t blob, int64_t pid, uint64_t start);
void pyshm_heap_prefault(pyshm_heap_t *h, uint64_t off, uint64_t len);
int pyshm_heap_publish(pyshm_heap_t *h, const char *name, size_t name_len, uint64_t blob,
                       uint64_t *version);
int pyshm_heap_pin(pyshm_heap_t *h, const char *name, size_t name_len, pyshm_pin_info_t *out);
int pyshm_heap_unpin(pyshm_heap_t *h, int64_t slot, uint64_t blob);
int pyshm_heap_delete(pyshm_heap_t *h, const char *name, size_t name_len);
int pyshm_heap_lookup(pyshm_heap_t *h, const char *name, size_t name_len, uint64_t *version);
int pyshm_heap_name_at(pyshm_heap_t *h, uint64_t index, char *name, size_t cap,
                       uint64_t *version, uint64_t *length);
uint64_t pyshm_heap_name_capacity(pyshm_heap_t *h);

int pyshm_heap_stats(pyshm_heap_t *h, pyshm_heap_stats_t *out);
int pyshm_heap_reclaim(pyshm_heap_t *h, pyshm_reclaim_t *out);
int pyshm_heap_check(pyshm_heap_t *h, char *msg, size_t cap);
int pyshm_heap_trim(pyshm_heap_t *h);  /* free pages back to the OS */
void pyshm_heap_set_fault(pyshm_heap_t *h, int point);
void pyshm_heap_fault_now(pyshm_heap_t *h, int point);

#endif
