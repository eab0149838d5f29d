"""The collector API, findings store and GuardDuty-compatible query API (issue: backend)."""
