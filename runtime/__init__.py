"""Runtime side: HF weights with targeted modules swapped for Triton-kernel modules."""
