"""Precision checks with msprobe (mindstudio-probe): layer-by-layer comparison of two models."""
