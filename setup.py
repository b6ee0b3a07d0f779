from setuptools import find_packages, setup

setup(
    name="minift",
    version="0.2.0",
    description="A minimal from-scratch LLM fine-tuning trainer (SFT, DPO, LoRA) with fused log-prob kernels",
    # Everything lives under minift/: a top-level folder would shadow an installed package of the same name
    # (Hugging Face's `kernels`, which transformers imports) whenever the repository root is on sys.path.
    packages=find_packages(include=["minift", "minift.*"]),
    package_data={"minift.datasets": ["*/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "safetensors",
        "tokenizers",
        "numpy",
        "scipy",
        "rich",
        "jinja2",  # chat templates are jinja2 programs
        "gguf",  # reads the embedded default model (a GGUF file)
        "matplotlib",  # the PNG of the training curves
    ],
    extras_require={
        # Peers used only to check our numbers; never imported by the runtime path.
        "test": ["pytest", "transformers", "peft", "trl", "rouge-score", "build",
                 "kernels"],  # Hugging Face's package of that name, installed beside ours (tests/test_package.py)
        # llama.cpp's Python binding, the runtime that checks GGUF exports (compiles llama.cpp: docs/export.md).
        "llama": ["llama-cpp-python"],
    },
    entry_points={
        "console_scripts": [
            "minift-sft = minift.cli:sft",
            "minift-dpo = minift.cli:dpo",
            "minift-eval = minift.cli:evaluate",
            "minift-generate = minift.cli:generate",
            "minift-study = minift.cli:study",
            "minift-export = minift.cli:export",
        ],
    },
)
