"""moe_jax: sparse Mixture-of-Experts Transformers in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="moe_jax",
    version="0.1.0",
    description="Sparse Mixture-of-Experts Transformers in JAX and Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_jax", "moe_jax.*"]),
    package_data={"moe_jax": ["corpora/*.gz"]},  # data.name='tiny_shakespeare'
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tokenizers>=0.15",  # a Hugging Face checkpoint's tokenizer.json (moe_jax.generate --hf)
        "absl-py",
        "tqdm",
        "tensorboardX",
        "qwix>=0.1.8",  # quantized expert weights (moe_jax.quantize; layers dequantize them)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "pytest-xdist",
            "hypothesis>=6",
            "ruff==0.17.6",
            "matplotlib",
            "nbclient",
            "nbformat",
            "ipykernel",
            # outside oracles for the Hugging Face interop tests; the CPU-only torch build
            # (pip finds 2.13.0+cpu among the local wheels; PyPI's default wheel pulls CUDA)
            "torch==2.13.0",
            "transformers>=5,<6",
            # libtpu, the TPU compiler, matching the installed jax: moe_jax.aot and its tests
            # compile for TPU slices on this CPU host (a CPU run is unaffected: moe_jax.cli)
            "jax[tpu]",
        ],
        "experiments": ["matplotlib", "pandas", "tensorboard"],
        "notebooks": ["jupyter", "nbclient", "nbformat", "ipykernel", "matplotlib"],
        "tf": ["tensorflow-cpu"],
    },
)
