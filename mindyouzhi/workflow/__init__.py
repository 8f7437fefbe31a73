"""The YouZhi pipeline end to end: ``mindyouzhi pipeline --recipe recipes/youzhi_*.yaml --out RUN``."""
