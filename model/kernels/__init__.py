"""Hand-written Pallas kernels (GPU hot paths), each with an XLA reference implementation."""
