/* In-segment layout of a shared closure heap.  Internal to csrc/.
 *
 *   [seg header 128][heap header][reader table][directory][arena ........]
 *
 * Everything refers to everything else by offset from the segment start.
 * One robust mutex (hdr->lock) guards every field below except where a
 * comment says otherwise.  Fields marked "derived" can be recomputed from the
 * primary data by heap_repair(); a process that dies mid-update may leave
 * them stale, never the primary data, because every primary change is one
 * aligned 8-byte store made last. */
#ifndef PYSHM_HEAP_LAYOUT_H
#define PYSHM_HEAP_LAYOUT_H
#include <pthread.h>
#include <stdint.h>

#include "heap.h"
#include "segment.h"

#define PYSHM_NBINS 64
#define PYSHM_ALIGN 16u
#define PYSHM_MIN_BLOCK 64u
#define PYSHM_PINS_PER_SLOT 256
#define PYSHM_DIR_NAME_MAX 104
/* Freed blocks of at least this many bytes can give their pages back to the
 * OS; a version replaced by a newer one keeps them for the next put. */
#define PYSHM_PUNCH_MIN (1u << 20)

typedef struct {
    pyshm_seg_header_t seg;
    uint8_t seg_pad[PYSHM_SEG_HEADER_SIZE - sizeof(pyshm_seg_header_t)];
    pthread_mutex_t lock;       /* robust, process-shared: guards all below */
    uint64_t readers_off, n_readers;
    uint64_t dir_off, dir_cap;  /* dir_cap is a power of two */
    uint64_t arena_off, arena_end;
    uint64_t bins[PYSHM_NBINS]; /* free-list heads by size class (derived) */
    uint64_t used_bytes;        /* bytes in used blocks, headers included (derived) */
    uint64_t n_names;           /* USED directory entries (derived) */
    uint64_t next_version;      /* last version handed out; only grows */
    uint64_t repair_epoch;      /* bumped by each repair; see blob.mark */
    uint64_t n_repairs;         /* repairs after a lock owner died */
} heap_hdr_t;

/* A block of the arena.  Blocks tile [arena_off, arena_end) exactly, so the
 * arena can always be walked from its start.  Invariant: size is a multiple
 * of 16, >= PYSHM_MIN_BLOCK, and off + size <= arena_end. */
typedef struct {
    uint64_t size;   /* whole block incl. this header; bit 0 = used */
    uint64_t prev;   /* size of the previous block, 0 for the first (derived) */
} block_t;

typedef struct {     /* payload of a free block: its free-list links (derived) */
    uint64_t next, prev;
} free_links_t;

#define BLOCK_USED 1ull
#define BLOCK_SIZE(b) ((b)->size & ~(uint64_t)(PYSHM_ALIGN - 1))

/* Low 32 bits of a free block's link word are a multiple of 16, so a stale
 * link can never be read as this magic (0x...42). */
#define PYSHM_BLOB_MAGIC 0x424c4f42u /* "BLOB" */

enum { BLOB_BUILDING = 1, BLOB_ACTIVE = 2, BLOB_OBSOLETE = 3 };

/* Header of a used block: one version of a closure.  Encoded data follows. */
typedef struct {
    uint32_t magic;
    uint32_t state;          /* BLOB_* */
    uint64_t version;
    uint64_t length;         /* bytes of encoded data after this header */
    uint64_t pins;           /* pins on it in the reader table (derived) */
    int64_t creator_pid;     /* the process building it */
    uint64_t creator_start;
    uint64_t mark;           /* repair epoch of the last walk that saw it */
    uint64_t reserved;
} blob_t;

#define BLOB_DATA(off) ((off) + sizeof(block_t) + sizeof(blob_t))

enum { DIR_EMPTY = 0, DIR_USED = 1, DIR_TOMB = 2 };

/* Directory entry: a name and the offset of its current version's block.
 * Publishing is the single store of `blob` (existing name) or of `state`
 * (new name, written after everything else). */
typedef struct {
    uint64_t hash;
    uint64_t blob;
    uint32_t state;          /* DIR_* */
    uint32_t name_len;
    char name[PYSHM_DIR_NAME_MAX];
} dir_entry_t;

typedef struct {             /* count > 0 marks a live pin of `blob` */
    uint64_t blob;
    uint64_t count;
} pin_t;

/* One slot per attached process.  Only its owner changes pins; all under
 * the lock.  pid == 0 marks a free slot. */
typedef struct {
    int64_t pid;
    uint64_t start;
    uint64_t hiwater;        /* pins[hiwater..] are all unused */
    uint64_t reserved;
    pin_t pins[PYSHM_PINS_PER_SLOT];
} reader_t;

/* The per-process handle. */
struct pyshm_heap {
    pyshm_segment_t seg;
    heap_hdr_t *hdr;         /* == seg.rw */
    int64_t slot;            /* my reader slot, -1 when observing only */
    int64_t pid;
    uint64_t start;
    int fault;               /* fault-injection point (tests), 0 = none */
};

/* ---- Internal units, bottom to top -------------------------------------
 * Each unit owns one structure and calls only the units listed above it
 * here (plus segment.h, robust_lock.h, proc.h below all of them):
 *
 *   fault.c        the handle's fault-injection point      -> (nothing)
 *   arena.c        block chain and free lists             -> fault
 *   blob.c         blob headers inside used blocks        -> arena
 *   directory.c    the name directory                     -> (nothing)
 *   readers.c      the reader table and its pins          -> proc, fault, blob
 *   heap_repair.c  rebuilding derived state after a crash -> proc, arena, blob,
 *                                                            directory, readers
 *   heap_check.c   the consistency checker                -> arena, blob,
 *                                                            directory, readers
 *   heap.c         header, lock, public API (heap.h)      -> everything above
 *
 * Everything below heap.c runs with the heap lock held: heap.c's heap_lock()
 * takes it (repairing first if its owner died) around every public call. */

/* fault.c: kills this process at fault point p when the tests asked for it
 * (pyshm_heap_set_fault).  A handle's fault point is private memory. */
void fault_point(pyshm_heap_t *h, int p);

/* arena.c: the block chain (primary) and its free lists (derived). */
void arena_init(pyshm_heap_t *h);
block_t *arena_block(pyshm_heap_t *h, uint64_t off);
free_links_t *arena_links(pyshm_heap_t *h, uint64_t off);
int arena_alloc(pyshm_heap_t *h, uint64_t payload, uint64_t *out);
int arena_free(pyshm_heap_t *h, uint64_t off, int give_back);
void arena_trim(pyshm_heap_t *h);
int arena_rebuild(pyshm_heap_t *h);
uint64_t arena_largest_free(pyshm_heap_t *h);
void arena_release_pages(pyshm_heap_t *h, uint64_t off, uint64_t size);

/* blob.c: the blob header at the start of a used block's payload. */
blob_t *blob_at(pyshm_heap_t *h, uint64_t off);
blob_t *blob_init(pyshm_heap_t *h, uint64_t off, uint64_t length);
int blob_drop(pyshm_heap_t *h, uint64_t off, int give_back);
void blob_census(pyshm_heap_t *h, pyshm_heap_stats_t *s);

/* directory.c: the open-addressing table of names. */
uint64_t dir_hash(const char *name, size_t len);
dir_entry_t *dir_entry(pyshm_heap_t *h, uint64_t i);
dir_entry_t *dir_find(pyshm_heap_t *h, const char *name, size_t len);
dir_entry_t *dir_slot_for_insert(pyshm_heap_t *h, const char *name, size_t len);
void dir_remove(pyshm_heap_t *h, dir_entry_t *e);

/* readers.c: one slot of pins per attached process. */
reader_t *reader_slot(pyshm_heap_t *h, int64_t i);
int readers_claim(pyshm_heap_t *h);
int readers_pin(pyshm_heap_t *h, uint64_t blob_off);
int readers_unpin(pyshm_heap_t *h, int64_t slot, uint64_t blob_off);
void readers_release_slot(pyshm_heap_t *h, reader_t *r);
int readers_reclaim_dead(pyshm_heap_t *h);
uint64_t readers_count(pyshm_heap_t *h, int alive);

/* heap_repair.c: rebuilds all derived state; *freed (may be NULL) counts
 * the blobs it freed. */
int heap_repair(pyshm_heap_t *h, uint64_t *freed);

/* heap_check.c: verifies every invariant; on failure writes a message of at
 * most cap bytes to msg and returns PYSHM_ERR_CORRUPT. */
int heap_check(pyshm_heap_t *h, char *msg, size_t cap);

#endif
