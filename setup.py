"""ctu: RL for tool-using customer-service agents, in JAX."""

import setuptools

BASE = [
    "absl-py",
    "array_record",
    "chex",
    "etils[epath]",
    "flax>=0.12",
    "jax>=0.10",
    "jsonschema",
    "matplotlib",
    "ml_collections",
    "numpy",
    "optax",
    "orbax-checkpoint",
    "rapidfuzz",
    "rich",
    "safetensors",
    "tensorboardX",
    "tensorflow-datasets",
    "tokenizers",
    "tqdm",
    "transformers>=5",
]

EXTRAS = {
    # Reference checks against PyTorch/transformers; pinned to the CPU wheel.
    "dev": ["torch==2.13.0", "pytest", "pytest-xdist", "hypothesis", "ruff", "tensorboard"],
    # Rollouts with vLLM on GPU (not installable on CPU-only machines).
    "gpu": ["vllm"],
}

setuptools.setup(
    name="ctu",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["ctu", "ctu.*", "launch", "configs"]),
    install_requires=BASE,
    extras_require=EXTRAS,
)
