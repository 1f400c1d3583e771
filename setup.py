"""moejax: Mixture-of-Experts research in JAX/Flax."""
import setuptools

setuptools.setup(
    name="moejax",
    version="0.1.0",
    description="Composable Mixture-of-Experts language models in JAX/Flax (Linen).",
    packages=setuptools.find_packages(include=["moejax", "moejax.*", "pallas_kernels", "pallas_kernels.*"]),
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
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6"],
        "plots": ["matplotlib>=3.8"],
    },
)
