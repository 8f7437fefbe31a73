"""mindyouzhi: GQA → MLA conversion (TransMLA + YouZhi layer-adaptive FreqFold) for MindSpore."""

__version__ = "0.1.0"
