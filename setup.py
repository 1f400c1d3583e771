"""moejax: Mixture-of-Experts research in JAX/Flax."""
import setuptools

setuptools.setup(
    name="moejax",
    version="0.1.0",
    description="Composable Mixture-of-Experts language models in JAX/Flax (Linen).",
    packages=setuptools.find_packages(include=["moejax", "moejax.*", "pallas_kernels",
                                               "pallas_kernels.*"]) + ["moejax.configs"],
    # The named configs live in the top-level configs/ (where run.py users look for them) and
    # install as moejax.configs (so moejax.get_config("gshard") works from any install).
    package_dir={"moejax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "ml-collections>=1.1",
        "chex>=0.1.92",
        "einops>=0.8",
        "absl-py>=2.1",
        "numpy>=2.0",
        "scipy>=1.13",   # t quantiles for multi-seed comparisons
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "safetensors>=0.4",   # checkpoint conversion (moejax.convert)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "nbclient>=0.10",
                 "nbformat>=5.10", "ipykernel>=6.29"],
        "plots": ["matplotlib>=3.8"],
        # conversion tests compare against transformers (torch: the CPU wheel, pinned in .ci/)
        "convert-test": ["torch>=2.4", "transformers>=5"],
    },
)
