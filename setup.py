"""nvila_jax: NVILA in JAX/Flax for TPU and GPU."""

from setuptools import find_packages, setup

setup(
    name="nvila_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of NVIDIA's NVILA vision-language model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["nvila_jax", "nvila_jax.*", "checkpoints_convert", "checkpoints_convert.*"]),
    package_data={"nvila_jax": ["assets/*", "kernels/cpu/*.cc", "kernels/cpu/*.h"]},
    install_requires=[
        # Versions that install together on Python 3.11 (see ../shared/docs/JAX_NOTES.md).
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "tensorstore==0.1.86",
        "ml-collections==1.1.0",
        "numpy>=2.4,<2.5",
        "pillow>=11",
        "einops>=0.8",
        "safetensors>=0.8,<0.9",
        "tokenizers>=0.23,<0.24",
        "scipy-openblas32>=0.3.30",  # the CPU GEMM kernel of prefill and the vision encoder (kernels/blas_matmul.py)
        "jinja2>=3.1",
        "tqdm>=4.66",
        "pyyaml>=6",
        "av>=14",
        "rapidfuzz>=3.9",
        "tensorboardX>=2.6",
        "matplotlib>=3.9",
    ],
    extras_require={
        # The PyTorch reference used by the tests; the CPU build of torch is pinned exactly.
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch==2.13.0", "transformers>=5,<6", "pyarrow>=15"],
        # Reading the Parquet releases of MMMU and Video-MME (`nvila-jax eval`).
        "eval": ["pyarrow>=15"],
    },
    entry_points={"console_scripts": ["nvila-jax=nvila_jax.cli:main"]},
)
