"""GPU kernels of the attention instance (Triton), each beside a plain-torch reference."""
