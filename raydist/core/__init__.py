"""Building blocks every stage uses: model and data loading, artifacts, evaluation, storage, run directories,
resources, preflight checks. Nothing here imports upward (train/distill/compress/sweep/serve/jobs)."""
