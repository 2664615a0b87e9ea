#include "robust_lock.h"
#include "pyshm_errors.h"

#include <errno.h>

int pyshm_lock_init(pthread_mutex_t *m) {
    pthread_mutexattr_t attr;
    if (pthread_mutexattr_init(&attr)) return PYSHM_ERR_SYS;
    int rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (!rc) rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (!rc) rc = pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc) { errno = rc; return PYSHM_ERR_SYS; }
    return PYSHM_OK;
}

int pyshm_lock_acquire(pthread_mutex_t *m) {
    int rc = pthread_mutex_lock(m);
    if (rc == 0) return 0;
    if (rc == EOWNERDEAD) return 1;
    if (rc == ENOTRECOVERABLE) return PYSHM_ERR_LOCK;
    errno = rc;
    return PYSHM_ERR_SYS;
}

void pyshm_lock_consistent(pthread_mutex_t *m) { pthread_mutex_consistent(m); }

void pyshm_lock_release(pthread_mutex_t *m) { pthread_mutex_unlock(m); }
