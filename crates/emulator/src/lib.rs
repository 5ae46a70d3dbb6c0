//! CUDA-on-CPU emulator (work in progress).
