"""Teacher -> student distillation: KD losses, the offline teacher cache, the distill stage, and generate
(sequence-level KD data from a teacher)."""
