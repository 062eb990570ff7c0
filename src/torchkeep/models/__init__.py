"""Whole models: save_model / load_model / load_for_inference, export with an equivalence
check, and inspect(nn.Module)."""
