"""Compression: structured and unstructured pruning, quantization (quant/), candidates and the Pareto front.
Pure torch/transformers: nothing here imports Ray."""
