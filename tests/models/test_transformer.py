"""Decoder LM: causality, attention against NumPy, layer pattern, logical axes, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import tiny_config
from moejax.layers.attention import Attention
from moejax.models.transformer import ModelConfig, Transformer
from moejax.layers.moe import MoESpec


def _model(kind="deepseekmoe", **model_over):
  c = tiny_config(kind)
  for k, v in model_over.items():
    c.model[k] = v
  return Transformer(ModelConfig.from_config(c.model))


@pytest.mark.parametrize("kind", ["dense", "deepseekmoe"])
def test_causal(kind):
  model = _model(kind)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  params = model.init(jax.random.key(1), tokens)["params"]
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, tokens.at[:, 7].set((tokens[:, 7] + 1) % 256))
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, 7:], b[:, 7:])
  assert a.shape == (2, 12, 256) and a.dtype == jnp.float32


@pytest.mark.parametrize("attention", ["standard", "mixture_of_heads", "latent"])
def test_packed_documents_see_only_themselves(attention):
  """Positions that restart mark packed documents: each document's logits equal its own forward,
  and no token sees a later one."""
  c = tiny_config("dense")
  c.model.attention = attention
  if attention == "mixture_of_heads":
    c.model.moh.head_compute = "selected"
  model = Transformer(ModelConfig.from_config(c.model))
  a = jax.random.randint(jax.random.key(0), (1, 7), 0, 256)
  b = jax.random.randint(jax.random.key(1), (1, 5), 0, 256)
  packed = jnp.concatenate([a, b], axis=1)
  positions = jnp.concatenate([jnp.arange(7), jnp.arange(5)])[None]
  params = model.init(jax.random.key(2), packed)["params"]
  got = model.apply({"params": params}, packed, positions=positions)
  np.testing.assert_allclose(got[:, :7], model.apply({"params": params}, a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[:, 7:], model.apply({"params": params}, b), rtol=1e-5, atol=1e-5)


def np_rope(x, pos, theta=10000.0):
  dh = x.shape[-1]
  freq = theta ** (-np.arange(0, dh // 2) * 2.0 / dh)
  ang = pos[:, None] * freq
  a, b = x[..., :dh // 2], x[..., dh // 2:]
  c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
  return np.concatenate([a * c - b * s, b * c + a * s], -1)


def test_gqa_attention_matches_numpy():
  h, g, dh, d, l = 4, 2, 8, 16, 6
  attn = Attention(h, g, dh)
  x = jax.random.normal(jax.random.key(0), (1, l, d))
  pos = jnp.arange(l)[None]
  p = nn.meta.unbox(attn.init(jax.random.key(1), x, pos)["params"])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  xn = np.asarray(x[0], np.float64)
  q = np_rope(np.einsum("ld,dhk->lhk", xn, p["query"]), np.arange(l))
  k = np_rope(np.einsum("ld,dhk->lhk", xn, p["key"]), np.arange(l))
  v = np.einsum("ld,dhk->lhk", xn, p["value"])
  out = np.zeros((l, h, dh))
  for head in range(h):
    kv = head // (h // g)                          # query head -> its shared kv head
    s = q[:, head] @ k[:, kv].T / np.sqrt(dh)
    s = np.where(np.tril(np.ones((l, l))) > 0, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, kv]
  want = np.einsum("lhk,hkd->ld", out, p["out"])
  np.testing.assert_allclose(attn.apply({"params": p}, x, pos)[0], want, rtol=1e-5, atol=1e-5)


def test_layer_pattern_first_dense_then_every_nth():
  spec = MoESpec(num_experts=4, top_k=1, expert_hidden=8)
  cfg = ModelConfig(num_layers=7, moe=spec, moe_every=2, first_dense_layers=1)
  assert [cfg.is_moe_layer(i) for i in range(7)] == [False, True, False, True, False, True, False]
  assert not ModelConfig(num_layers=3).is_moe_layer(0)
  model = _model("gshard")
  c = tiny_config("gshard")
  c.model.moe.first_dense_layers = 1
  params = Transformer(ModelConfig.from_config(c.model)).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert "ffn" in params["layer_0"] and "moe" in params["layer_1"]
  del model


def test_every_param_has_logical_axes_of_its_rank():
  model = _model("deepseekmoe")
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  specs = nn.get_partition_spec(boxed)
  params = nn.meta.unbox(boxed)
  for (path, p), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                             jax.tree.leaves(specs, is_leaf=lambda s: s is None or
                                             isinstance(s, jax.sharding.PartitionSpec))):
    assert isinstance(spec, jax.sharding.PartitionSpec), path
    assert len(spec) == p.ndim, (path, spec, p.shape)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]}
  expert_specs = [v for k, v in flat.items() if "experts" in k]
  assert expert_specs and all(s[0] == "expert" for s in expert_specs)


def test_bfloat16_compute_close_to_float32():
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 256)
  m32, m16 = _model("deepseekmoe"), _model("deepseekmoe", dtype="bfloat16")
  params = m32.init(jax.random.key(1), tokens)["params"]
  a = m32.apply({"params": params}, tokens)
  b = m16.apply({"params": params}, tokens)
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(jax.nn.softmax(a), jax.nn.softmax(b), atol=5e-2)


def test_init_variance_is_one_over_true_fan_in():
  """Each projection's weights have std ~ 1/sqrt(fan_in), fan_in = its input width only (an
  expert bank must not count its expert axis, nor a fused gate/up its "2" axis)."""
  c = tiny_config("deepseekmoe")
  c.model.d_model, c.model.moe.expert_hidden = 64, 256
  model = Transformer(ModelConfig.from_config(c.model))
  p = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  d, h = 64, 128
  layer = p["layer_0"]
  fan_in = {("moe", "experts", "wi"): d, ("moe", "experts", "wo"): h, ("moe", "shared", "wi"): d,
            ("moe", "shared", "wo"): 2 * h, ("attn", "query"): d, ("attn", "key"): d,
            ("attn", "out"): 4 * 8}
  for path, n in fan_in.items():
    w = layer
    for k in path:
      w = w[k]
    # truncated normal at 2 std has std 0.88 of the untruncated one; flax rescales to match.
    np.testing.assert_allclose(np.std(np.asarray(w)), 1 / np.sqrt(n), rtol=0.1, err_msg=str(path))
  np.testing.assert_allclose(np.std(np.asarray(p["unembed"])), 1 / np.sqrt(d), rtol=0.1)
