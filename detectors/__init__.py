"""Detection: the finding-type catalog, detector units, threat lists (issue: detectors)."""
