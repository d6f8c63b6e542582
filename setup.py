"""usp: hybrid Ulysses x ring sequence-parallel attention for very long contexts."""
from setuptools import find_packages, setup

setup(
    name="usp",
    version="0.1.0",
    description="Hybrid Ulysses x ring sequence-parallel attention with a topology-aware planner",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["usp", "usp.*", "planner", "planner.*"]),
    package_data={"planner": ["presets/*.yaml"], "usp": ["csrc/*.cu", "csrc/*.cpp"]},
    include_package_data=True,
    # torch: a range the CPU build 2.13.0 satisfies (a bare requirement would pull a multi-GB CUDA build).
    install_requires=["torch>=2.6,<2.14", "networkx>=3.0", "pyyaml>=6.0", "rich>=13.0"],
    extras_require={
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "transformers>=4.56"],
        "flash": ["flash-attn-4"],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["usp-plan=planner.cli:main"]},
)
