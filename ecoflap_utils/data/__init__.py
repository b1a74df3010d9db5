"""Calibration and evaluation data: bundled sets (text, images) and standard on-disk formats."""
