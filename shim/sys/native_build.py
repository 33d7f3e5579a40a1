"""Builds shim.sys._native: the few syscalls the standard library lacks."""

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int pyshim_set_child_subreaper(void);
    """
)
ffibuilder.set_source(
    "shim.sys._native",
    """
    #include <sys/prctl.h>

    int pyshim_set_child_subreaper(void) { return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
