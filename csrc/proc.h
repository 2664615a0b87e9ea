/* Process identity: a pid plus its start time, so a reused pid is not taken
 * for the process that held a slot before it. */
#ifndef PYSHM_PROC_H
#define PYSHM_PROC_H
#include <stdint.h>
#include <sys/types.h>

/* Start time of pid in clock ticks since boot (field 22 of /proc/PID/stat).
 * Returns 0 and sets *out, or PYSHM_ERR_SYS when the process does not exist. */
int pyshm_proc_start_time(int64_t pid, uint64_t *out);

/* 1 when (pid, start) names a running process, 0 when it is gone, a zombie,
 * or its pid now belongs to a process that started later. */
int pyshm_proc_alive(int64_t pid, uint64_t start);

#endif
