"""reports: forgetting and instruction-following reports (not built yet: see the experiments issue)."""
