"""SGMV/BGMV LoRA kernels: the pure-PyTorch reference (the CPU path) and the CUDA launcher."""
