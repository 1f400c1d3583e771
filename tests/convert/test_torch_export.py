"""moejax-only variants exported to the self-contained PyTorch module (moejax/convert/
torch_model.py), run in a subprocess where `import jax` fails: logits equal moejax's."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")

from conftest import tiny_config  # noqa: E402
from moejax import config as config_lib  # noqa: E402
from moejax.api import build_model  # noqa: E402
from moejax.convert import ConversionError, export_torch  # noqa: E402

MOH = {"model.attention": "mixture_of_heads", "model.moh.shared_heads": 1,
       "model.moh.active_heads": 2}
# Each variant combines several options (one compilation each); all dropless (the export
# routes without capacity).
VARIANTS = {
    "ternary_top_p_moh_code_qk_bias_dense_first": ("deepseekmoe", {
        **MOH, "model.moe.expert_bank": "ternary_swiglu", "model.moe.shared_trainable": False,
        "model.moe.router": "top_p", "model.moe.top_p": 0.3, "model.moe.top_k": 4,
        "model.qk_norm": "full", "model.qkv_bias": True, "model.moe.first_dense_layers": 1,
        "model.num_layers": 3}),
    "lory_gated_shared_moh_binary_query_norm": ("deepseekmoe", {
        **MOH, "model.moh.gating": "binary_ste", "model.moh.router": "query_norm",
        "model.moe.merge": "causal_segments", "model.moe.merge_segment": 4,
        "model.moe.shared_expert_gate": True}),
    "smear_moh_paper": ("gshard", {**MOH, "model.moh.gating": "paper",
                                   "model.moe.merge": "sequence"}),
    "null_experts_chain_qk_head": ("gshard", {"model.moe.null_experts": 2,
                                              "model.moe.iterations": 2,
                                              "model.qk_norm": "head"}),
    "latent_sigmoid_groups_heterogeneous": ("deepseekmoe", {
        "model.moe.expert_sizes": (32, 24, 16, 16, 8, 8, 8, 16),
        "model.attention": "latent", "model.mla.q_lora_rank": 8, "model.mla.kv_lora_rank": 8,
        "model.mla.qk_nope_head_dim": 4, "model.mla.qk_rope_head_dim": 4,
        "model.mla.v_head_dim": 6, "model.moe.router": "sigmoid",
        "model.moe.num_expert_groups": 4, "model.moe.groups_per_token": 2,
        "model.moe.routed_scaling_factor": 2.0}),
    # what compression writes: per-layer sizes (neuron pruning), a folded router (merging)
    "compressed_layer_sizes_and_merged_experts": ("gshard", {
        "model.moe.num_experts": 0, "model.moe.routed_experts": 4,
        "model.moe.active_experts": 2, "model.moe.expert_hidden": 32,
        "model.moe.layer_overrides": '{"0": {"expert_sizes": [48, 32, 24, 24]}, '
                                     '"1": {"expert_map": [0, 1, 2, 3, 1, 2]}}'}),
    # mixed precision: the last 3 of 8 routed experts ternary, the others full precision
    "mixed_precision_experts": ("deepseekmoe", {"model.moe.ternary_experts": 3}),
}


def _workdir(path, kind, overrides, seed):
  """A workdir whose parameters are all perturbed off their init (norm scales, biases, router
  selection biases too), written as an import writes one (parameters only)."""
  from flax import linen as nn
  from moejax.convert.hf import _write_workdir
  c = config_lib.apply_overrides(tiny_config(kind), {"model.moe.dispatch": "dropless",
                                                     **overrides})
  model = build_model(c)
  params = jax.jit(lambda r: nn.meta.unbox(model.init({"params": r}, jnp.zeros((1, 8),
                                                                              jnp.int32))))(
      jax.random.key(seed))["params"]
  leaves, tree = jax.tree.flatten(jax.device_get(params))
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(x + 0.2 * rng.standard_normal(x.shape) * max(np.std(x), 0.5),
                       np.float32) for x in leaves]
  params = jax.tree.unflatten(tree, leaves)
  _write_workdir(str(path), c, params)
  return c, params


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp("torch_export")
  tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
  out = {}
  for seed, (name, (kind, overrides)) in enumerate(VARIANTS.items()):
    config, params = _workdir(root / name, kind, overrides, seed)
    want = np.asarray(build_model(config).apply({"params": params}, jnp.asarray(tokens)))
    export_torch(str(root / name), str(root / f"{name}_torch"), progress=False)
    out[name] = (root / f"{name}_torch", want)
  return root, tokens, out


@pytest.mark.slow
def test_exported_variants_match_moejax_without_jax(exports):
  root, tokens, out = exports
  jobs = [(str(d), str(root / f"{n}.npy")) for n, (d, _) in out.items()]
  for d, _ in jobs:
    assert os.path.isfile(os.path.join(d, "modeling_moejax.py"))
  script = (
      "import sys, importlib\n"
      "sys.modules['jax'] = None   # prove the module needs no JAX\n"
      "import numpy as np, torch\n"
      f"tokens = torch.tensor(np.array({tokens.tolist()}))\n"
      f"for d, out in {jobs!r}:\n"
      "  sys.path.insert(0, d)\n"
      "  sys.modules.pop('modeling_moejax', None)\n"
      "  m = importlib.import_module('modeling_moejax')\n"
      "  np.save(out, m.load(d)(tokens).numpy())\n"
      "  sys.path.pop(0)\n")
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  for name, (_, want) in out.items():
    got = np.load(root / f"{name}.npy")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
  # Ternary experts are stored as 2-bit codes + scales, never as latent floats.
  from safetensors.numpy import load_file
  t = load_file(out["ternary_top_p_moh_code_qk_bias_dense_first"][0] / "model.safetensors")
  packed = t["layer_1/moe/experts/wi/packed"]           # layer 0 is dense in this variant
  # the kernels' K-planar layout (packed workdirs store the same): d_model 32 / 4 codes per
  # byte = 8 plane rows, 2 x 16 hidden columns; one scale per column
  assert packed.dtype == np.uint8 and packed.shape == (8, 8, 32)
  assert t["layer_1/moe/experts/wi/scale"].shape == (8, 32)
  assert "layer_1/moe/experts/wi" not in t and "layer_1/moe/experts/wo" not in t


def test_unsupported_router_is_named():
  from moejax.convert.torch_export import torch_config
  c = config_lib.apply_overrides(tiny_config("gshard"), {"model.moe.router": "hash"})
  with pytest.raises(ConversionError, match="model.moe.router='hash' has no PyTorch export"):
    torch_config(build_model(c).cfg)
