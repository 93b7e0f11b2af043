"""Installs the kernel library ``unicom_kernels`` and the pipeline package ``unicom``."""

from setuptools import find_packages, setup

# The oldest triton the kernels are checked with; triton ships Linux wheels only.
TRITON = "triton>=3.6"

setup(
    name="unicom-kernels",
    version="0.1.0",
    description="Fused, memory-bounded margin softmax with dual partial selection (UNICOM), Triton + PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["unicom_kernels", "unicom_kernels.*", "unicom", "unicom.*"]),
    # No triton here: each CUDA build of torch pins its own triton and CPU-only builds need
    # none, so a triton requirement of ours would conflict with most torch releases. Only the
    # triton backend needs it: the "triton" extra (or a CUDA torch whose pin is >= 3.6).
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
    ],
    extras_require={
        "triton": [TRITON],
        # The interpreted Triton kernels are part of the test suite.
        "test": ["pytest>=8", "ruff>=0.6", TRITON],
        "pipeline": [
            "open_clip_torch>=2.24",
            "faiss-cpu>=1.7.4",
            "timm>=0.9",
            "scikit-learn>=1.0",
            "pyyaml>=6.0",
            "tqdm>=4.60",
            "webdataset>=0.2.86",
            "matplotlib>=3.5",
            "pillow>=9.0",
        ],
        "bench": ["pytorch-metric-learning>=2.5", "cut-cross-entropy>=25.1", "matplotlib>=3.7", "tqdm>=4.60"],
        "gpu": [TRITON, "faiss-gpu"],
    },
    entry_points={
        "console_scripts": [
            "unicom-features=unicom.features:main",
            "unicom-cluster=unicom.cluster:main",
            "unicom-train=unicom.train:main",
            "unicom-evaluate=unicom.evaluate:main",
            "unicom-demo=unicom.demo:main",
        ]
    },
)
