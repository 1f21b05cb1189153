"""Speculative decoding: draft providers whose proposals the target verifies inside the shared batch."""
