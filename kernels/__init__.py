"""LoRA SGMV/BGMV ops: the CUDA kernels, their PyTorch reference, and the batched-matmul CPU path."""
