"""Inference: batched generation from a KV cache (``generate``), sampling rules, cache sizes."""
from moejax.inference.cache import cache_bytes, cache_shapes, init_cache  # noqa: F401
from moejax.inference.generate import (GenerateResult, GenerationError,  # noqa: F401
                                       check_request, generate)
