/* Error codes shared by every C module of pyshm.  Functions return 0 on
 * success or one of these negative codes; PYSHM_ERR_SYS means errno holds the
 * cause.  pyshm/_native_build.py declares every #define here to cffi (Python
 * reads them as lib.PYSHM_ERR_*); pyshm/native.py maps each code to a Python
 * exception (its ERRORS table). */
#ifndef PYSHM_ERRORS_H
#define PYSHM_ERRORS_H

#define PYSHM_OK 0
#define PYSHM_ERR_SYS (-1)        /* a system call failed; see errno */
#define PYSHM_ERR_MAGIC (-2)      /* not a pyshm segment */
#define PYSHM_ERR_LAYOUT (-3)     /* segment written by another layout version */
#define PYSHM_ERR_KIND (-4)       /* segment of another kind (heap, ring, ...) */
#define PYSHM_ERR_FULL (-5)       /* no free block large enough */
#define PYSHM_ERR_NOTFOUND (-6)   /* no closure of that name */
#define PYSHM_ERR_CORRUPT (-7)    /* an offset failed its bounds check */
#define PYSHM_ERR_NOSLOT (-8)     /* reader table full */
#define PYSHM_ERR_PINS (-9)       /* this process holds too many pins */
#define PYSHM_ERR_DIRFULL (-10)   /* closure directory full */
#define PYSHM_ERR_NAME (-11)      /* name empty or too long */
#define PYSHM_ERR_EXISTS (-12)    /* segment already exists */
#define PYSHM_ERR_TOOSMALL (-13)  /* requested segment size too small */
#define PYSHM_ERR_NOTREADY (-14)  /* segment still being initialised */
#define PYSHM_ERR_LOCK (-15)      /* lock not recoverable */
#define PYSHM_ERR_STATE (-16)     /* operation on a blob in the wrong state */

#endif
