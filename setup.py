from setuptools import find_packages, setup

setup(
    name="minift",
    version="0.1.0",
    description="A minimal from-scratch LLM fine-tuning trainer (SFT, DPO, LoRA) with fused log-prob kernels",
    packages=find_packages(include=["minift", "minift.*", "kernels", "kernels.*"]),
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
        "test": ["pytest", "transformers", "peft", "trl", "rouge-score"],
    },
)
