"""evals: lm-eval before/after training and the offline benchmark suite (not built yet: see the evaluations issue)."""
