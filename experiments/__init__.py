"""Experiments on trained models, run as `python -m experiments.<name>` from the repository root."""
