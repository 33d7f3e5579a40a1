# Types of the cffi module built by native_build.py (keep the two in step).

class _CData: ...

class _FFI:
    errno: int
    def cast(self, ctype: str, value: int) -> _CData: ...
    def memmove(self, dest: _CData, src: bytes, n: int) -> None: ...

class _Lib:
    MS_RDONLY: int
    MS_NOSUID: int
    MS_NODEV: int
    MS_NOEXEC: int
    MS_SYNCHRONOUS: int
    MS_REMOUNT: int
    MS_MANDLOCK: int
    MS_DIRSYNC: int
    MS_NOATIME: int
    MS_NODIRATIME: int
    MS_BIND: int
    MS_REC: int
    MS_RELATIME: int
    MS_STRICTATIME: int
    MNT_DETACH: int
    IN_NONBLOCK: int
    IN_CLOEXEC: int
    IN_MODIFY: int
    IN_IGNORED: int
    def pyshim_set_child_subreaper(self) -> int: ...
    def pyshim_clear_child_subreaper(self) -> int: ...
    def pyshim_is_child_subreaper(self) -> int: ...
    def mount(
        self, source: bytes, target: bytes, filesystemtype: bytes, mountflags: int, data: bytes
    ) -> int: ...
    def umount2(self, target: bytes, flags: int) -> int: ...
    def inotify_init1(self, flags: int) -> int: ...
    def inotify_add_watch(self, fd: int, pathname: bytes, mask: int) -> int: ...
    def inotify_rm_watch(self, fd: int, wd: int) -> int: ...

ffi: _FFI
lib: _Lib
