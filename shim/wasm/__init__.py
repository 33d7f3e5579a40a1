"""The WebAssembly backend's parts: the container cgroup, the module cache and the child runner."""
