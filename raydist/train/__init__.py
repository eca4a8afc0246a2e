"""Fine-tuning on Ray Train + DeepSpeed: training plumbing (DeepSpeed config, optimizer, schedule, RNG), the
worker session every training stage runs, export, and the finetune stage."""
