"""hat-edge: Hardware-Aware Transformers, found, exported, deployed and benchmarked on edge devices."""

__version__ = "0.1.0"
