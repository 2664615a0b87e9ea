/* Fault injection for the crash tests (tests/test_crash.py).
 *
 * Owns: the handle's fault point (pyshm_heap_t.fault), private memory of
 * this process; no lock guards it and it touches nothing in the segment.
 * Calls: nothing of pyshm (only kill/getpid).
 *
 * The fault_point() calls stay where the other units placed them: each
 * PYSHM_FAULT_* of heap.h names one spot in their execution order. */
#include "heap_layout.h"

#include <signal.h>
#include <unistd.h>

/* Dies here, with SIGKILL (no cleanup, the lock stays held), when this
 * handle was told to die at point p. */
void fault_point(pyshm_heap_t *h, int p) {
    if (h->fault == p) kill(getpid(), SIGKILL);
}

void pyshm_heap_set_fault(pyshm_heap_t *h, int point) { h->fault = point; }

/* For points the Python side reaches (PYSHM_FAULT_ENCODE). */
void pyshm_heap_fault_now(pyshm_heap_t *h, int point) { fault_point(h, point); }
