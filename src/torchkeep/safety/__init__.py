"""The security boundary: the checking unpickler, its allowlist and argument checks, torch
files read without torch.load, inert stand-ins, contained names and bounded JSON."""
