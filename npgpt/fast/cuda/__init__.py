"""CUDA fast paths."""
