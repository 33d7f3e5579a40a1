"""pyshim: containerd runtime-v2 shims in Python."""

VERSION = "0.1.0"
