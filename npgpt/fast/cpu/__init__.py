"""CPU fast paths."""
