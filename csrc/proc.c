#include "proc.h"
#include "pyshm_errors.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Reads /proc/PID/stat into buf; returns the length or -1. */
static int read_stat(int64_t pid, char *buf, size_t cap) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[n] = '\0';
    return (int)n;
}

/* The fields after the command name, which may itself hold spaces and ')'. */
static const char *after_comm(const char *buf) {
    const char *p = strrchr(buf, ')');
    return p ? p + 2 : NULL;
}

int pyshm_proc_start_time(int64_t pid, uint64_t *out) {
    char buf[1024];
    if (pid <= 0 || read_stat(pid, buf, sizeof buf) < 0) return PYSHM_ERR_SYS;
    const char *p = after_comm(buf);
    if (!p) return PYSHM_ERR_SYS;
    /* p starts at field 3 (state); starttime is field 22. */
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p) return PYSHM_ERR_SYS;
        p++;
    }
    *out = strtoull(p, NULL, 10);
    return PYSHM_OK;
}

static int is_zombie(int64_t pid) {
    char buf[1024];
    if (read_stat(pid, buf, sizeof buf) < 0) return 1;
    const char *p = after_comm(buf);
    return !p || *p == 'Z' || *p == 'X';
}

int pyshm_proc_alive(int64_t pid, uint64_t start) {
    if (pid <= 0) return 0;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) return 0;
    uint64_t now_start;
    if (pyshm_proc_start_time(pid, &now_start) != PYSHM_OK) return 0;
    if (now_start != start) return 0;
    return !is_zombie(pid);
}
