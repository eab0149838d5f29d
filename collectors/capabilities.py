"""What this process may do: capabilities, namespaces. Used by every source's probe."""

from __future__ import annotations

import os

from collectors import procfs

# Linux capability numbers (include/uapi/linux/capability.h)
CAP_NAMES = {
    0: "CHOWN",
    1: "DAC_OVERRIDE",
    2: "DAC_READ_SEARCH",
    3: "FOWNER",
    4: "FSETID",
    5: "KILL",
    6: "SETGID",
    7: "SETUID",
    8: "SETPCAP",
    9: "LINUX_IMMUTABLE",
    10: "NET_BIND_SERVICE",
    11: "NET_BROADCAST",
    12: "NET_ADMIN",
    13: "NET_RAW",
    14: "IPC_LOCK",
    15: "IPC_OWNER",
    16: "SYS_MODULE",
    17: "SYS_RAWIO",
    18: "SYS_CHROOT",
    19: "SYS_PTRACE",
    20: "SYS_PACCT",
    21: "SYS_ADMIN",
    22: "SYS_BOOT",
    23: "SYS_NICE",
    24: "SYS_RESOURCE",
    25: "SYS_TIME",
    26: "SYS_TTY_CONFIG",
    27: "MKNOD",
    28: "LEASE",
    29: "AUDIT_WRITE",
    30: "AUDIT_CONTROL",
    31: "SETFCAP",
    32: "MAC_OVERRIDE",
    33: "MAC_ADMIN",
    34: "SYSLOG",
    35: "WAKE_ALARM",
    36: "BLOCK_SUSPEND",
    37: "AUDIT_READ",
    38: "PERFMON",
    39: "BPF",
    40: "CHECKPOINT_RESTORE",
}
# The kernel gives the initial namespaces fixed inode numbers (PROC_*_INIT_INO).
INIT_PID_NS = 0xEFFFFFFC
INIT_USER_NS = 0xEFFFFFFD


def effective_caps(pid: int | str = "self") -> set[str]:
    data = procfs.read_small(f"/proc/{pid}/status")
    status = {k: v for k, _, v in (line.partition(b":") for line in data.splitlines())}
    mask = int(status.get(b"CapEff", b"0").strip(), 16)
    return {name for bit, name in CAP_NAMES.items() if mask >> bit & 1}


def namespace_inode(kind: str, pid: int | str = "self") -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return int(link[link.index("[") + 1 : -1])


def in_initial_pid_namespace() -> bool:
    return namespace_inode("pid") == INIT_PID_NS


def in_initial_user_namespace() -> bool:
    return namespace_inode("user") == INIT_USER_NS
