"""Installs the `jenga` package from `src/` (``pip install -e .``)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

# The library needs only requirements.txt; these serve the paper's artifact (runner, fine-tuning, lm_eval,
# figures, the real-model study) and the tests (which exercise the artifact too: install both for the suite).
EXTRAS = {
    "experiments": [
        "accelerate>=1.0",
        "datasets>=2.14",
        "gguf>=0.10",
        "lm-eval>=0.4",
        "matplotlib>=3.8",
        "pandas>=2.0",
        "tqdm>=4.66",
    ],
    "test": ["pytest>=8", "ruff>=0.5"],
    # apply_jenga(fused_kernels=True) and the runner's liger baselines
    "liger": ["liger-kernel>=0.8.5"],
    # the runner's --backend deepspeed-zero2/3 (ZeRO-3 with checkpointing needs 0.19.3: docs/multi-gpu.md)
    "multi-gpu": ["deepspeed>=0.19.3"],
}

setup(
    name="jenga",
    version="0.1.0",
    description="Long-context LoRA fine-tuning with contextual token sparsity (Jenga, ATC'25)",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={**EXTRAS, "dev": EXTRAS["experiments"] + EXTRAS["test"] + EXTRAS["liger"]},
)
