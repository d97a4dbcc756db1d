"""What a container may do, as docker allows it by default, and the steps that hold it to that.

A container keeps docker's default capabilities (``DEFAULT_CAPABILITIES``; ``--cap-add``/``--cap-drop``
change the set), runs with no_new_privs and under docker's default seccomp profile, sees the ``/proc``
and ``/sys`` paths docker masks empty and the ones it makes read-only read-only, cannot open device nodes
of its rootfs (docker's device cgroup does that; here the rootfs is mounted nodev), and gets no descriptor
but 0, 1 and 2. ``--privileged`` lifts all of it but the descriptors, as docker does.

``seccomp_default.json`` beside this module is moby's ``profiles/seccomp/default.json`` (the Moby
project, Apache License 2.0), unchanged. Its rules depend on the capabilities kept and the architecture
(``includes``/``excludes``); ``Confinement.seccomp`` resolves them the way docker does, into the OCI
runtime spec's form, which runc applies itself (``layerfs bundle``) and ``seccomp_filter`` builds for
``layerfs run`` through libseccomp.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import pyseccomp

from .. import syscalls
from ..errors import UsageError
from ..syscalls import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REC, MS_REMOUNT

# Capability names by number (linux/capability.h).
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
DEFAULT_CAPABILITIES = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    }
)
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

_PROFILE = os.path.join(os.path.dirname(__file__), "seccomp_default.json")
# The machine as docker's profile names it (Go's GOARCH) and as libseccomp does.
_ARCHES = {
    "x86_64": ("amd64", "SCMP_ARCH_X86_64"),
    "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
    "riscv64": ("riscv64", "SCMP_ARCH_RISCV64"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
}
_OPERATORS = {
    "SCMP_CMP_NE": pyseccomp.NE,
    "SCMP_CMP_LT": pyseccomp.LT,
    "SCMP_CMP_LE": pyseccomp.LE,
    "SCMP_CMP_EQ": pyseccomp.EQ,
    "SCMP_CMP_GE": pyseccomp.GE,
    "SCMP_CMP_GT": pyseccomp.GT,
    "SCMP_CMP_MASKED_EQ": pyseccomp.MASKED_EQ,
}
_UNKNOWN_SYSCALL = -1  # libseccomp's __NR_SCMP_ERROR: a name it does not know (newer than it): left out, as runc does


def _capability(name: str) -> str:
    """``chown``, ``CHOWN`` or ``CAP_CHOWN`` as ``CAP_CHOWN`` (``ALL`` as it is)."""
    name = name.upper()
    if name == "ALL":
        return name
    name = name if name.startswith("CAP_") else "CAP_" + name
    if name not in CAPABILITIES:
        raise UsageError(f"unknown capability {name!r}")
    return name


@dataclass(frozen=True)
class Confinement:
    capabilities: frozenset[str] = DEFAULT_CAPABILITIES  # the ones kept (``CAP_`` names)
    privileged: bool = False  # none of it: every capability the caller has, no seccomp, nothing masked

    @classmethod
    def from_flags(
        cls, cap_add: Iterable[str] = (), cap_drop: Iterable[str] = (), privileged: bool = False
    ) -> Confinement:
        """docker's rules: ``--privileged`` keeps everything (and ignores the others); ``--cap-add ALL``
        keeps all but the dropped; ``--cap-drop ALL`` keeps only the added; otherwise the defaults less the
        dropped plus the added."""
        add, drop = {_capability(c) for c in cap_add}, {_capability(c) for c in cap_drop}
        if privileged:
            return cls(frozenset(CAPABILITIES), privileged=True)
        if "ALL" in add:
            kept = set(CAPABILITIES) - drop
        elif "ALL" in drop:
            kept = add
        else:
            kept = (set(DEFAULT_CAPABILITIES) - drop) | add
        return cls(frozenset(kept - {"ALL"}))

    def seccomp(self) -> dict | None:
        """Docker's profile for these capabilities on this machine, in the OCI runtime spec's form
        (``linux.seccomp``); None when privileged."""
        return None if self.privileged else _resolved_profile(self.capabilities)

    def seccomp_filter(self) -> pyseccomp.SyscallFilter | None:
        """The filter ``enter`` loads, built beforehand (outside the container: the profile is read here)."""
        profile = self.seccomp()
        return None if profile is None else _filter(profile)


@functools.cache
def _docker_profile() -> dict:
    with open(_PROFILE) as f:
        return json.load(f)


def _kernel_at_least(version: str) -> bool:
    def numbers(release: str) -> tuple[int, ...]:
        return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in release.split(".")[:2])

    return numbers(os.uname().release) >= numbers(version)


def _resolved_profile(capabilities: frozenset[str]) -> dict:
    """As moby's setupSeccomp: a rule is kept when the machine and capabilities are all its ``includes``
    ask and none its ``excludes`` name."""
    profile = _docker_profile()
    arch, native = _ARCHES.get(os.uname().machine, (os.uname().machine, None))
    architectures = []
    for entry in profile["archMap"]:
        if entry["architecture"] == native:
            architectures = [native, *(entry["subArchitectures"] or [])]

    def kept(rule: dict) -> bool:
        includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
        return (
            all(c in capabilities for c in includes.get("caps", []))
            and ("arches" not in includes or arch in includes["arches"])
            and ("minKernel" not in includes or _kernel_at_least(includes["minKernel"]))
            and not any(c in capabilities for c in excludes.get("caps", []))
            and arch not in excludes.get("arches", [])
        )

    rules = [
        {k: v for k, v in rule.items() if k in ("names", "action", "errnoRet", "args")}
        for rule in profile["syscalls"]
        if kept(rule)
    ]
    return {
        "defaultAction": profile["defaultAction"],
        "defaultErrnoRet": profile["defaultErrnoRet"],
        "architectures": architectures,
        "syscalls": rules,
    }


def _action(name: str, errno_ret: int | None) -> int:
    if name == "SCMP_ACT_ALLOW":
        return pyseccomp.ALLOW
    if name == "SCMP_ACT_ERRNO":
        return pyseccomp.ERRNO(1 if errno_ret is None else errno_ret)  # (EPERM unless told, as runc has it)
    raise ValueError(f"seccomp action {name} is not one layerfs applies")


def _filter(profile: dict) -> pyseccomp.SyscallFilter:
    """A libseccomp filter of an OCI ``linux.seccomp``, as runc builds it."""
    f = pyseccomp.SyscallFilter(_action(profile["defaultAction"], profile.get("defaultErrnoRet")))
    for name in profile["architectures"]:
        arch = getattr(pyseccomp.Arch, name.removeprefix("SCMP_ARCH_"))
        if arch != pyseccomp.system_arch():
            f.add_arch(arch)
    for rule in profile["syscalls"]:
        action = _action(rule["action"], rule.get("errnoRet"))
        args = [
            pyseccomp.Arg(a["index"], _OPERATORS[a["op"]], a["value"], a.get("valueTwo", 0))
            for a in rule.get("args") or []
        ]
        for name in rule["names"]:
            number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
            if number != _UNKNOWN_SYSCALL:
                f.add_rule(action, number, *args)
    return f


def remount(target: str, flags: int) -> None:
    """Remount the bind mount at ``target`` with ``flags`` added to the ones it has."""
    kept = os.statvfs(target).f_flag & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)  # (ST_* == MS_* here)
    syscalls.mount(target, target, None, MS_BIND | MS_REMOUNT | kept | flags)


def confine_rootfs(rootfs: str, confinement: Confinement) -> None:
    """(In the container's mount namespace, before pivot_root: ``rootfs`` bind-mounted on itself, its /proc,
    /sys and /dev mounted.) Device nodes made in the rootfs cannot be opened, which docker's device cgroup
    denies (mknod itself is allowed: CAP_MKNOD); docker's masked paths are empty (a read-only tmpfs on a
    directory, /dev/null on a file) and its read-only paths read-only. Paths this kernel lacks are skipped."""
    if confinement.privileged:
        return
    remount(rootfs, MS_NODEV)
    for path in MASKED_PATHS:
        target = os.path.join(rootfs, path.lstrip("/"))
        with contextlib.suppress(FileNotFoundError):
            if os.path.isdir(target):
                syscalls.mount("tmpfs", target, "tmpfs", MS_RDONLY)
            else:
                syscalls.mount(os.path.join(rootfs, "dev/null"), target, None, MS_BIND)
    for path in READONLY_PATHS:
        target = os.path.join(rootfs, path.lstrip("/"))
        try:
            syscalls.mount(target, target, None, MS_BIND | MS_REC)
        except FileNotFoundError:
            continue
        remount(target, MS_RDONLY)


def bound_capabilities(confinement: Confinement) -> None:
    """Drop what is not kept from the bounding set, while still root with every capability (CAP_SETPCAP)."""
    if confinement.privileged:
        return
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for number in range(last + 1):
        if number >= len(CAPABILITIES) or CAPABILITIES[number] not in confinement.capabilities:
            syscalls.drop_bounding_capability(number)


def _permitted() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("CapPrm:"))


def enter(confinement: Confinement, seccomp: pyseccomp.SyscallFilter | None, uid: int) -> None:
    """The last steps before exec, after setuid: the kept capabilities as the process's own (root's only:
    another user has none, as under docker), no ambient ones, no_new_privs, no descriptor but 0, 1 and 2,
    and the seccomp filter last, so that nothing before it needs what it forbids."""
    if not confinement.privileged:
        # (Only what this process has can be kept: the caller may lack some, the kernel know fewer.)
        kept = sum(1 << CAPABILITIES.index(c) for c in confinement.capabilities) & _permitted() if uid == 0 else 0
        syscalls.set_capabilities(effective=kept, permitted=kept, inheritable=0)
        syscalls.clear_ambient_capabilities()
        syscalls.set_no_new_privs()
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2:
            with contextlib.suppress(OSError):  # (the listing's own descriptor, closed already)
                os.close(fd)
    if seccomp is not None:
        seccomp.load()
