"""The VM backend's host side (shim.runtimes.kata): its settings, the VM, the guest's view of
a container's spec, and the stdio relay to the guest agent."""
