"""Weight quantization: the int8/int4 layer and on-disk format, GPTQ, QAT."""
