"""Detectors of this family: see registry.FAMILIES (being written)."""

from __future__ import annotations

from detectors.base import Detector

DETECTORS: tuple[type[Detector], ...] = ()
