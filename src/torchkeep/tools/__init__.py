"""What the command line does, as functions: convert, diff, stats and verify."""
