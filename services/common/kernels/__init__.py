"""GPU kernels (Triton), each beside a plain-torch reference."""
