#include "segment.h"
#include "proc.h"
#include "pyshm_errors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int pyshm_segment_path(char *out, const char *name) {
    size_t n = strlen(name);
    if (n == 0 || n > PYSHM_NAME_MAX || strchr(name, '/')) return PYSHM_ERR_NAME;
    snprintf(out, PYSHM_NAME_MAX + 8, "/pyshm.%s", name);
    return PYSHM_OK;
}

/* Maps the open fd twice (rw and ro); on failure leaves nothing mapped. */
static int map_both(pyshm_segment_t *seg) {
    void *rw = mmap(NULL, seg->size, PROT_READ | PROT_WRITE, MAP_SHARED, seg->fd, 0);
    if (rw == MAP_FAILED) return PYSHM_ERR_SYS;
    void *ro = mmap(NULL, seg->size, PROT_READ, MAP_SHARED, seg->fd, 0);
    if (ro == MAP_FAILED) {
        int e = errno;
        munmap(rw, seg->size);
        errno = e;
        return PYSHM_ERR_SYS;
    }
    seg->rw = rw;
    seg->ro = ro;
    return PYSHM_OK;
}

static void close_keep_errno(int fd) {
    int e = errno;
    close(fd);
    errno = e;
}

int pyshm_segment_create(pyshm_segment_t *seg, const char *name, uint64_t size, uint32_t kind) {
    memset(seg, 0, sizeof *seg);
    int rc = pyshm_segment_path(seg->path, name);
    if (rc) return rc;
    if (size < 4096) return PYSHM_ERR_TOOSMALL;
    seg->fd = shm_open(seg->path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (seg->fd < 0) return errno == EEXIST ? PYSHM_ERR_EXISTS : PYSHM_ERR_SYS;
    /* ftruncate makes a sparse file: pages cost memory only once touched. */
    seg->size = size;
    if (ftruncate(seg->fd, (off_t)size) != 0 || (rc = map_both(seg)) != 0) {
        int e = errno;
        close(seg->fd);
        shm_unlink(seg->path);
        errno = e;
        return PYSHM_ERR_SYS;
    }
    pyshm_seg_header_t *h = (pyshm_seg_header_t *)seg->rw;
    h->magic = PYSHM_SEG_MAGIC;
    h->layout_version = PYSHM_LAYOUT_VERSION;
    h->kind = kind;
    h->size = size;
    h->creator_pid = getpid();
    pyshm_proc_start_time(h->creator_pid, &h->creator_start);
    /* `ready` stays 0 until the kind-specific initialisation is done:
     * the caller publishes it with pyshm_segment_publish. */
    return PYSHM_OK;
}

/* Waits up to ~1 s for a segment being created by another process.  A
 * header that is neither zero (just truncated) nor ours fails at once. */
static int wait_ready(const pyshm_seg_header_t *h) {
    for (int i = 0; i < 1000; i++) {
        uint64_t magic = __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE);
        if (magic && magic != PYSHM_SEG_MAGIC) return PYSHM_ERR_MAGIC;
        if (__atomic_load_n(&h->ready, __ATOMIC_ACQUIRE)) return PYSHM_OK;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return PYSHM_ERR_NOTREADY;
}

static int check_header(const pyshm_seg_header_t *h, uint64_t file_size, uint32_t kind) {
    if (h->magic != PYSHM_SEG_MAGIC) return PYSHM_ERR_MAGIC;
    if (h->layout_version != PYSHM_LAYOUT_VERSION) return PYSHM_ERR_LAYOUT;
    if (kind && h->kind != kind) return PYSHM_ERR_KIND;
    if (h->size != file_size) return PYSHM_ERR_CORRUPT;
    return PYSHM_OK;
}

/* Opens and fstat()s a segment; sets seg->fd and seg->size. */
static int open_existing(pyshm_segment_t *seg, const char *name, int flags) {
    memset(seg, 0, sizeof *seg);
    seg->fd = -1;
    int rc = pyshm_segment_path(seg->path, name);
    if (rc) return rc;
    seg->fd = shm_open(seg->path, flags, 0600);
    if (seg->fd < 0) return errno == ENOENT ? PYSHM_ERR_NOTFOUND : PYSHM_ERR_SYS;
    struct stat st;
    if (fstat(seg->fd, &st) != 0) { close_keep_errno(seg->fd); return PYSHM_ERR_SYS; }
    if ((uint64_t)st.st_size < PYSHM_SEG_HEADER_SIZE) { close(seg->fd); return PYSHM_ERR_MAGIC; }
    seg->size = (uint64_t)st.st_size;
    return PYSHM_OK;
}

int pyshm_segment_attach(pyshm_segment_t *seg, const char *name, uint32_t kind) {
    int rc = open_existing(seg, name, O_RDWR);
    if (rc) return rc;
    if ((rc = map_both(seg)) != 0) { close_keep_errno(seg->fd); return rc; }
    const pyshm_seg_header_t *h = (const pyshm_seg_header_t *)seg->ro;
    rc = wait_ready(h);
    if (!rc) rc = check_header(h, seg->size, kind);
    if (rc) pyshm_segment_detach(seg);
    return rc;
}

void pyshm_segment_detach(pyshm_segment_t *seg) {
    if (seg->rw) munmap(seg->rw, seg->size);
    if (seg->ro) munmap((void *)seg->ro, seg->size);
    if (seg->fd >= 0) close(seg->fd);
    seg->rw = NULL;
    seg->ro = NULL;
    seg->fd = -1;
}

int pyshm_segment_unlink(const char *name) {
    char path[PYSHM_NAME_MAX + 8];
    int rc = pyshm_segment_path(path, name);
    if (rc) return rc;
    if (shm_unlink(path) != 0) return errno == ENOENT ? PYSHM_ERR_NOTFOUND : PYSHM_ERR_SYS;
    return PYSHM_OK;
}

int pyshm_segment_probe(const char *name, pyshm_seg_info_t *info) {
    pyshm_segment_t seg;
    int rc = open_existing(&seg, name, O_RDONLY);
    if (rc) return rc;
    pyshm_seg_header_t h;
    ssize_t n = pread(seg.fd, &h, sizeof h, 0);
    close(seg.fd);
    if (n != (ssize_t)sizeof h || h.magic != PYSHM_SEG_MAGIC) return PYSHM_ERR_MAGIC;
    info->size = seg.size;
    info->kind = h.kind;
    info->layout_version = h.layout_version;
    info->creator_pid = h.creator_pid;
    info->creator_start = h.creator_start;
    info->creator_alive = pyshm_proc_alive(h.creator_pid, h.creator_start);
    return h.layout_version == PYSHM_LAYOUT_VERSION ? PYSHM_OK : PYSHM_ERR_LAYOUT;
}
