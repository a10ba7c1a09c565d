"""Using a run's checkpoints: per-task validation, predictions, `load()`, analysis, plots."""
