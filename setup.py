"""Installs the `jenga` package from `src/` (``pip install -e .``)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

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
    extras_require={"dev": ["pytest>=8", "ruff>=0.5"]},
)
