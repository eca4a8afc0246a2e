"""Ray Tune sweeps: the compression sweep (prune x quantize candidates, Pareto front, winner policy) and the
fine-tuning hyperparameter sweep (ASHA)."""
