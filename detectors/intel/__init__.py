"""Threat intelligence: bundled and user lists, O(1)/O(log n) lookups (being written)."""

from __future__ import annotations


class ThreatIntel:
    pass
