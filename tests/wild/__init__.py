"""A corpus of checkpoint files written by the tools people train with.

``generate.py`` writes, with fixed seeds and the real libraries (Lightning, transformers,
accelerate, omegaconf, torch.ao, TorchScript, ...), one small file or folder per layout into
``tests/data/wild/`` together with ``cases.json``, which says for each file how torch's own
loading path reads it, which model it belongs in, and which entry holds the weights.
``tests/test_wild.py`` loads every file both ways, torch's and torchkeep's, and compares the
resulting models tensor by tensor and on a fixed input.

``models.py`` holds the classes and builders both sides need. Whole-model pickles name its
classes as ``wild.models.<Name>``, so ``tests/`` must be on ``sys.path`` when torch unpickles
them (pytest puts it there; ``generate.py`` does so itself).

Regenerate with ``rm -r tests/data/wild; .venv/bin/python tests/wild/generate.py [outdir]`` (default
``tests/data/wild``).
"""
