"""The detector families: one module each, each exporting ``DETECTORS`` (its Detector classes).

A reader finds a type's whole story in one place: its catalog entry
(catalog.toml), its family module here, its test staging the real attack.
"""

from __future__ import annotations

import importlib

from detectors.base import Detector

FAMILIES = (
    "reverse_shell",  # Execution:Runtime/ReverseShell
    "threat_intel",  # every threat-list type, MetadataDNSRebind, TorRelay, MaliciousFileExecuted, stratum miners
    "tools",  # Execution:Runtime/SuspiciousTool
    "commands",  # */SuspiciousCommand of each tactic
    "process_behaviour",  # NewBinaryExecuted, SuspiciousShellCreated, ElevationToRoot
    "memory",  # FilelessExecution, ProcessInjection.*, PtraceAntiDebugging, UserfaultfdUsage, NewLibraryLoaded
    "escape",  # DockerSocketAccessed, RuncContainerEscape, CGroupsReleaseAgentModified, mounts, kernel modules
    "sensitive_files",  # */SensitiveFileModified
)


def detector_classes() -> list[type[Detector]]:
    out: list[type[Detector]] = []
    for family in FAMILIES:
        module = importlib.import_module(f"detectors.{family}")
        out.extend(module.DETECTORS)
    return out
