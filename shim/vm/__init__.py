"""Virtual machines: the Debian kernel and its modules, the initramfs, the QEMU command line and
the accelerator probe. scripts/vm-test boots cgroup v2 test guests with them."""
