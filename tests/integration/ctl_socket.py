# SPDX-License-Identifier: GPL-2.0-or-later
"""Finding a mounted pool's daemon through its control socket (stdlib only:
the pytest fixtures and scripts/soak.py both use it)."""
import os
import socket
import struct


def ctl_socket_path(mnt):
    """/run/thinfs/<fnv1a64(realpath)>.sock, as src/fs/ctl-protocol.c."""
    h = 0xcbf29ce484222325
    for b in os.path.realpath(mnt).encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"/run/thinfs/{h:016x}.sock"


def socket_peer_pid(path):
    """pid of the process listening on the unix socket (SO_PEERCRED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[0]
