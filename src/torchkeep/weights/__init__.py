"""Weights: save, load, load_state_dict, inspect; which entry holds the weights; name
matching; loading with torch's module semantics; reports; low-memory assignment."""
