/* A process-shared robust mutex living inside a segment.  When its owner
 * dies, the next locker is told so and must repair the data it guards before
 * calling pyshm_lock_consistent. */
#ifndef PYSHM_ROBUST_LOCK_H
#define PYSHM_ROBUST_LOCK_H
#include <pthread.h>

int pyshm_lock_init(pthread_mutex_t *m);

/* Returns 0 when locked normally, 1 when locked but the previous owner died
 * holding it (the caller repairs, then calls pyshm_lock_consistent), or a
 * negative PYSHM_ERR_* code. */
int pyshm_lock_acquire(pthread_mutex_t *m);
void pyshm_lock_consistent(pthread_mutex_t *m);
void pyshm_lock_release(pthread_mutex_t *m);

#endif
