"""Builds shim.sys._native: the few syscalls the standard library lacks.

Call the functions through `shim.sys._native.lib`; on failure they return -1 and leave the
cause in `shim.sys._native.ffi.errno`.
"""

from cffi import FFI  # type: ignore[import-untyped]

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int pyshim_set_child_subreaper(void);
    int pyshim_clear_child_subreaper(void);
    int pyshim_is_child_subreaper(void);

    #define MS_RDONLY ...
    #define MS_NOSUID ...
    #define MS_NODEV ...
    #define MS_NOEXEC ...
    #define MS_SYNCHRONOUS ...
    #define MS_REMOUNT ...
    #define MS_MANDLOCK ...
    #define MS_DIRSYNC ...
    #define MS_NOATIME ...
    #define MS_NODIRATIME ...
    #define MS_BIND ...
    #define MS_REC ...
    #define MS_RELATIME ...
    #define MS_STRICTATIME ...
    #define MNT_DETACH ...
    int mount(const char *source, const char *target, const char *filesystemtype,
              unsigned long mountflags, const char *data);
    int umount2(const char *target, int flags);

    #define IN_NONBLOCK ...
    #define IN_CLOEXEC ...
    #define IN_MODIFY ...
    #define IN_IGNORED ...
    int inotify_init1(int flags);
    int inotify_add_watch(int fd, const char *pathname, uint32_t mask);
    int inotify_rm_watch(int fd, int wd);

    int setns(int fd, int nstype);
    int unshare(int flags);
    int pyshim_open_tree(int dirfd, const char *path, unsigned int flags);
    int pyshim_move_mount(int from_dirfd, const char *from_path, int to_dirfd,
                          const char *to_path, unsigned int flags);
    """
)
ffibuilder.set_source(
    "shim.sys._native",
    """
    #include <sched.h>
    #include <sys/inotify.h>
    #include <sys/mount.h>
    #include <sys/prctl.h>
    #include <sys/syscall.h>
    #include <unistd.h>

    int pyshim_set_child_subreaper(void) { return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); }

    int pyshim_clear_child_subreaper(void) { return prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0); }

    /* 1 or 0, or -1 with errno set. */
    int pyshim_is_child_subreaper(void)
    {
        int value = 0;
        if (prctl(PR_GET_CHILD_SUBREAPER, (unsigned long)&value, 0, 0, 0) != 0)
            return -1;
        return value != 0;
    }

    /* The new mount API (Linux 5.2): by number, as C libraries before glibc 2.36 lack them. */
    int pyshim_open_tree(int dirfd, const char *path, unsigned int flags)
    {
        return (int)syscall(SYS_open_tree, dirfd, path, flags);
    }

    int pyshim_move_mount(int from_dirfd, const char *from_path, int to_dirfd,
                          const char *to_path, unsigned int flags)
    {
        return (int)syscall(SYS_move_mount, from_dirfd, from_path, to_dirfd, to_path, flags);
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
