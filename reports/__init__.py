"""Reports of a run: tidy tables (`tidy`), statistics (`stats`), forgetting and instruction-following tables,
plots, rendering, the writer of a run's reports (`writer`) and the checkpoint gate (`gate`)."""
