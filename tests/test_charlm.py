"""The character LM (models.decoder), its text (train.text) and `jaxprune prune`."""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune import cli, posttrain
from jaxprune.models.decoder import Attention, CharLM
from jaxprune.train import config as config_lib
from jaxprune.train import data, lm_depth, metrics, models, prune, run, text

TINY = {
  "model.dim": 16,
  "model.depth": 2,
  "model.heads": 4,
  "model.kv_heads": 2,
  "model.mlp_dim": 32,
  "data.seq_len": 16,
  "data.batch_size": 8,
  "data.eval_batch_size": 256,
  "train.steps": 4,
  "train.warmup_steps": 1,
  "train.eval_every": 4,
  "checkpoint.every": 4,
  "train.progress": False,
  "posttrain.calibration": 8,
}


def tiny_config(name="configs/charlm_wanda.py", **fields):
  overrides = {**TINY, **fields}
  return config_lib.load_config(name, [f"{k}={v!r}" for k, v in overrides.items()])


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the text differs between versions")
def test_topics_text_is_pinned_for_python_3_11():
  full = text.topics_text()
  assert (len(full), len(set(full))) == (464_970, 103)
  ds = data.load("pydoc_topics", seq_len=64)
  assert ds.num_classes == 103 and ds.image_shape == (64,)
  assert len(ds.train) == 418_473 - 64 and len(ds.test) == (46_497 - 65) // 64 + 1


def test_windows_are_next_character_pairs_and_validation_is_disjoint():
  ds = data.load("pydoc_topics", seq_len=32)
  vocab = text.vocabulary()
  full = vocab.encode(text.topics_text())
  x, y = ds.train.take(np.array([0, 5, len(ds.train) - 1]))
  assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (3, 32)
  np.testing.assert_array_equal(x[1], full[5:37])
  np.testing.assert_array_equal(y[1], full[6:38])
  vx, vy = ds.test.take(np.arange(len(ds.test)))
  n_train = len(ds.train) + 32  # training windows start at every character
  np.testing.assert_array_equal(vx.reshape(-1), full[n_train : n_train + vx.size])
  np.testing.assert_array_equal(vy[:, -1], vx[1:, 0].tolist() + [full[n_train + vx.size]])
  assert vocab.decode(vocab.encode("def f():")) == "def f():"


def _reference_attention(attn, x):
  """Grouped-query causal attention in NumPy, KV heads repeated per query head."""
  q_w, k_w, v_w, o_w = (
    np.asarray(getattr(attn, n).kernel[...], np.float64)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj")
  )
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
  q = (x @ q_w).reshape(b, t, h, d)
  k = (x @ k_w).reshape(b, t, kv, d)
  v = (x @ v_w).reshape(b, t, kv, d)
  half = d // 2
  angle = np.arange(t)[:, None] * 10_000.0 ** (-np.arange(half) / half)
  cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]

  def rot(z):
    return np.concatenate([z[..., :half] * cos - z[..., half:] * sin,
                           z[..., :half] * sin + z[..., half:] * cos], -1)  # fmt: skip

  q, k = rot(q), rot(k)
  out = np.zeros((b, t, h, d))
  for head in range(h):
    j = head // (h // kv)
    s = np.einsum("bqd,bsd->bqs", q[:, :, head], k[:, :, j]) / np.sqrt(d)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out[:, :, head] = np.einsum("bqs,bsd->bqd", p / p.sum(-1, keepdims=True), v[:, :, j])
  return out.reshape(b, t, h * d) @ o_w


@nnx.jit
def forward(module, x):
  """One compile of the whole forward pass (eagerly, every op compiles on its own)."""
  return module(x)


def test_grouped_query_attention_matches_a_numpy_reference():
  attn = Attention(16, 4, 2, 8, rngs=nnx.Rngs(3))
  x = np.random.default_rng(0).standard_normal((2, 7, 16)).astype(np.float32)
  np.testing.assert_allclose(forward(attn, x), _reference_attention(attn, x), rtol=2e-4, atol=2e-5)


def test_charlm_is_causal_and_takes_per_block_sizes():
  model = CharLM(11, dim=16, depth=2, num_heads=(4, 2), num_kv_heads=(2, 1), mlp_dim=(32, 8),
                 rngs=nnx.Rngs(0))  # fmt: skip
  tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
  changed = tokens.at[0, 4].set(9)
  a, b = forward(model, tokens), forward(model, changed)
  np.testing.assert_allclose(a[0, :4], b[0, :4], atol=1e-6)
  assert not np.allclose(a[0, 4:], b[0, 4:])
  assert model.blocks[1].attn.k_proj.kernel.shape == (16, 4)  # one KV head of 4
  assert model.blocks[1].mlp.down_proj.kernel.shape == (8, 16)
  with pytest.raises(ValueError, match=r"num_heads \(3\) must be a positive multiple"):
    Attention(12, 3, 2, 4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"model.kv_heads": 3}, r"^model\.kv_heads: 3 key/value heads must divide model\.heads"),
    ({"model.dim": 12, "model.heads": 4}, r"^model\.heads: model\.dim \(12\) / 4 heads"),
    ({"data.name": "digits"}, r"^model\.name: charlm reads token ids"),
    ({"posttrain.sparsity": 1.0}, r"^posttrain\.sparsity: must be in \[0, 1\)"),
    ({"posttrain.structure": "4:2"}, r"^posttrain\.structure: must be 'unstructured' or 'N:M'"),
    ({"posttrain.method": "obs"}, r"^posttrain\.method: must be one of"),
  ],
)
def test_bad_fields_fail_at_load_naming_the_field(fields, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    tiny_config(**fields)


@pytest.mark.parametrize(
  "fields, message",
  [
    (
      {"model.dim": 36, "model.heads": 2, "model.kv_heads": 1, "posttrain.structure": "4:8"},
      r"posttrain\.structure: 4:8 groups 8 .* layer 'blocks/0/attn/k_proj/kernel' has 36 inputs",
    ),
    (
      {"posttrain.layers": "^decoder/"},
      r"posttrain\.layers: '\^decoder/' matches none .* head/kernel",
    ),
    ({"posttrain.blocks": "^blocks/"}, r"posttrain\.blocks: .* needs exactly one capturing group"),
    (
      {"posttrain.blocks": r"^blocks/(0)/"},
      r"puts the selected layer 'blocks/1/attn/k_proj/kernel' in no",
    ),
  ],
)
def test_prune_checks_the_model_before_any_work(fields, message):
  config = tiny_config(**fields, **{"train.workdir": "/nonexistent/run"})
  with pytest.raises(config_lib.ConfigError, match=message):
    prune.prune_checkpoint(config)


def test_magnitude_nm_masks_every_block_projection_and_nothing_else():
  config = tiny_config("configs/charlm_magnitude.py", **{"posttrain.structure": "2:4"})
  model = models.from_config(config.model, (16,), 20)
  params, masks = prune.prune_model(config, model, [])
  flat = dict(jax.tree_util.tree_flatten_with_path(masks)[0])
  paths = {jax.tree_util.keystr(k) for k in flat}
  assert all("blocks" in p for p in paths) and len(paths) == 14
  for mask in flat.values():
    groups = np.asarray(mask).reshape(-1, 4, mask.shape[-1]).sum(1)
    assert (groups == 2).all()  # 2 of every 4 consecutive inputs, per output
  assert np.asarray(params["head"]["kernel"][...]).all()


def test_owl_in_the_recipe_gives_each_block_its_own_sparsity():
  config = tiny_config(**{"posttrain.owl": True, "posttrain.sparsity": 0.7})
  model = models.from_config(config.model, (16,), 20)
  up = model.blocks[1].mlp.up_proj.kernel
  up[...] = up[...].at[:2].multiply(100.0)  # outlier scores in block 1: it keeps more
  batches = [np.random.default_rng(0).integers(0, 20, (4, 16)).astype(np.int32)]
  _, masks = prune.prune_model(config, model, batches)
  kept = [float(np.asarray(b["mlp"]["up_proj"]["kernel"]).mean()) for b in masks["blocks"].values()]
  _, direct = posttrain.prune(model, None, batches, method="wanda", sparsity=0.7, owl=True,
                              stack=True, where=r"^blocks/")  # fmt: skip
  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(direct), strict=True):
    np.testing.assert_array_equal(a, b)
  assert kept[0] < kept[1] and np.mean(kept) == pytest.approx(0.3, abs=1 / 16)
  with pytest.raises(config_lib.ConfigError, match=r"^posttrain\.owl: OWL sets each block"):
    prune.check(tiny_config(**{"posttrain.owl": True, "posttrain.structure": "2:4"}))


def test_train_then_prune_from_the_command_line(tmp_path, capsys):
  workdir = tmp_path / "run"
  args = [f"--config.{k}={v}" for k, v in TINY.items()] + [f"--config.train.workdir={workdir}"]
  assert cli.main(["train", "--config", "configs/charlm.py", *args]) == 0
  out = capsys.readouterr().out
  assert re.search(r"validation perplexity: \d+\.\d{3}", out)
  record = [r for r in metrics.read_csv(workdir) if r["test_perplexity"]][-1]
  assert record["test_perplexity"] == pytest.approx(np.exp(record["test_loss"]))

  assert cli.main(["prune", "--config", "configs/charlm_wanda.py", *args]) == 0
  out = capsys.readouterr().out
  dense, pruned = re.findall(r"\| (?:dense|wanda) \| [^|]+\| (\d+\.\d+) \|", out)
  assert float(dense) == pytest.approx(record["test_perplexity"], rel=1e-4)
  assert re.search(r"blocks/1/mlp/down_proj/kernel\s+32x16\s+512\s+256\s+50\.00%", out)
  assert "embed/embedding" not in out and "head/kernel" not in out
  out_dir = workdir / "wanda_50"
  assert {"masks.npz", "prune.json", "prune.md", "checkpoints"} <= {
    p.name for p in out_dir.iterdir()
  }
  with np.load(out_dir / "masks.npz") as masks:
    assert len(masks.files) == 14 and masks["blocks/0/attn/q_proj/kernel"].mean() == 0.5
  assert float(pruned) > 0

  depth_args = ["--config.posttrain.method=shortgpt", "--config.posttrain.drop_blocks=1"]
  assert cli.main(["prune", "--config", "configs/charlm.py", *args, *depth_args]) == 0
  out = capsys.readouterr().out
  removed = int(re.search(r"\| lowest Block Influence removed \((\d)\) \| 1 \|", out).group(1))
  saved = json.loads((workdir / "shortgpt_1" / "depth.json").read_text())
  assert saved["config"]["model"]["depth"] == 1 and saved["removed"] == [removed]
  assert saved["influence"][removed] == min(saved["influence"])
  config = tiny_config(**{"model.depth": saved["config"]["model"]["depth"]})
  shallow = models.from_config(config.model, (16,), 103)  # rebuilt from the saved config
  with np.load(workdir / "shortgpt_1" / "shallow.npz") as arrays:
    for path, leaf in jaxprune.tree.leaves_with_paths(nnx.state(shallow, nnx.Param)):
      assert arrays[path].shape == leaf.shape
  with pytest.raises(config_lib.ConfigError, match=r"^posttrain\.drop_blocks: 2 blocks removed"):
    lm_depth.check(tiny_config(**{"posttrain.method": "shortgpt", "posttrain.drop_blocks": 2}))


def test_an_interrupted_lm_run_resumes_to_the_same_params(tmp_path):
  fields = {"train.lr_schedule": "constant", "train.warmup_steps": 0, "checkpoint.every": 2}
  fields.update({"prune.begin": 1, "prune.end": 1})  # not following train.steps (unused)
  whole = run.Run(
    tiny_config("configs/charlm.py", **fields, **{"train.workdir": str(tmp_path / "a")})
  )
  first = run.Run(
    tiny_config(
      "configs/charlm.py", **fields, **{"train.workdir": str(tmp_path / "b"), "train.steps": 2}
    )
  )
  first.execute()
  resumed = run.Run(
    tiny_config("configs/charlm.py", **fields, **{"train.workdir": str(tmp_path / "b")})
  )
  a, b = whole.execute(), resumed.execute()
  assert b.resumed_from == 2
  for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
    np.testing.assert_array_equal(x, y)
