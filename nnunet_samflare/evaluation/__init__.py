"""FLARE23 evaluation (DSC/NSD as the official evaluator computes them), efficiency profiling and plots."""
