/* POSIX shared-memory segments: create, attach, detach, unlink by name.
 *
 * Every segment starts with pyshm_seg_header_t.  A segment is mapped twice:
 * read-write for the code that updates it and read-only for the views handed
 * to applications, so a view cannot write even through a stray pointer. */
#ifndef PYSHM_SEGMENT_H
#define PYSHM_SEGMENT_H
#include <stdint.h>

#define PYSHM_SEG_MAGIC 0x314d48535950ULL /* "PYSHM1" little-endian */
#define PYSHM_LAYOUT_VERSION 1u
#define PYSHM_SEG_HEADER_SIZE 128u
#define PYSHM_NAME_MAX 200

enum { PYSHM_KIND_HEAP = 1 };

/* Invariant: magic, layout_version, kind and size are written before `ready`
 * is set to 1 and never change after. */
typedef struct {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t kind;
    uint64_t size;            /* bytes mapped, == file size */
    int64_t creator_pid;
    uint64_t creator_start;   /* creator's /proc start time */
    uint64_t ready;           /* 1 once fully initialised (release store) */
} pyshm_seg_header_t;

typedef struct {
    char path[PYSHM_NAME_MAX + 8]; /* "/pyshm.<name>" */
    int fd;
    uint8_t *rw;          /* read-write mapping */
    const uint8_t *ro;    /* read-only mapping of the same pages */
    uint64_t size;
} pyshm_segment_t;

/* What `pyshm clean` needs to know of a segment without attaching it. */
typedef struct {
    uint64_t size;
    uint32_t kind;
    uint32_t layout_version;
    int64_t creator_pid;
    uint64_t creator_start;
    int creator_alive;
} pyshm_seg_info_t;

int pyshm_segment_path(char *out, const char *name);
int pyshm_segment_create(pyshm_segment_t *seg, const char *name, uint64_t size, uint32_t kind);
int pyshm_segment_attach(pyshm_segment_t *seg, const char *name, uint32_t kind);
void pyshm_segment_detach(pyshm_segment_t *seg);
int pyshm_segment_unlink(const char *name);
int pyshm_segment_probe(const char *name, pyshm_seg_info_t *info);

/* 1 when [off, off+len) lies inside the segment. */
static inline int pyshm_in_bounds(const pyshm_segment_t *seg, uint64_t off, uint64_t len) {
    return off <= seg->size && len <= seg->size - off;
}

#endif
