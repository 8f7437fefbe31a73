"""Export of a converted model as a stock DeepSeek-V3 checkpoint (``deepseek.export_deepseek_v3``)."""

# The layouts `mindyouzhi export --format` writes.  Kept here, not in plan.py, so that the CLI can
# list them without importing plan.py's MindSpore model code.
FORMATS = ("deepseek-v3", "mindformers")
