"""Host identity: two processes with the same id share memory and loopback."""

from __future__ import annotations

import functools
import socket

__all__ = ["host_id"]


@functools.cache
def host_id() -> str:
    """``boot_id/hostname``: equal only for processes of one running kernel.

    The boot id changes on every boot and differs between machines (and VMs);
    containers of one host share it, but also share /dev/shm only when
    configured to, so ``shm`` still verifies by opening the segment.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{boot}/{socket.gethostname()}"
