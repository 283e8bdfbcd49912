"""Hand-written kernels for the decode step, one contract for two devices: gpu.py (Triton, CUDA) and cpu.py (C, x86-64
with AVX2). Each computes the same math as the model's PyTorch lines around it, which stay the reference."""
