"""Fuzz harnesses for torchkeep's parsers (see run.py)."""
