"""Hugging Face checkpoints in and out (jaxprune.models.hf) and `jaxprune prune --checkpoint`.

The fixtures in tests/fixtures/hf/ are tiny random checkpoints written by transformers
(benchmarks/make_hf_fixtures.py) with the logits transformers computed for them.
"""

import dataclasses
import filecmp
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune
from jaxprune.models import Decoder, DecoderConfig, config_of, hf
from jaxprune.train import hf_prune, text

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
NAMES = ["llama3", "mistral", "qwen2", "qwen3", "llama_sharded"]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  out = {}
  for file in sorted(directory.glob("*.safetensors")):
    out.update(load_file(file))
  return out


@nnx.jit
def _forward(model: nnx.Module, tokens: jax.Array) -> jax.Array:
  return model(tokens)


def logits(model: nnx.Module, tokens: np.ndarray) -> np.ndarray:
  """One compiled forward pass (eager mode compiles every op of a new shape apart: slower)."""
  return np.asarray(_forward(model, jnp.asarray(tokens)), np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(name):
  model, checkpoint = hf.load_hf(FIXTURES / name)
  reference = np.load(FIXTURES / name / "reference.npz")
  for n in (6, 11):
    got = logits(model, reference["tokens"][:, :n])
    np.testing.assert_allclose(got, reference[f"logits_{n}"], rtol=0, atol=1e-4)
  assert checkpoint.config.depth == 2 and checkpoint.config.vocab_size == 64


@pytest.mark.parametrize(
  ("name", "option", "value"),
  [("llama3", "rope_scaling", None), ("mistral", "sliding_window", None)],
)
def test_fixtures_exercise_the_option(name, option, value):
  """Without Llama 3's rope scaling / Mistral's window the logits differ from transformers'."""
  model, checkpoint = hf.load_hf(FIXTURES / name)
  assert getattr(checkpoint.config, option) is not None
  plain = dataclasses.replace(checkpoint.config, **{option: value})
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: plain.make(nnx.Rngs(0))))
  other = nnx.merge(graphdef, nnx.state(model))
  reference = np.load(FIXTURES / name / "reference.npz")
  assert np.abs(logits(other, reference["tokens"]) - reference["logits_11"]).max() > 1e-2


def test_config_fields_of_both_transformers_versions():
  """llama3's config.json has 4.x fields (rope_theta, rope_scaling, torch_dtype), qwen3's 5.x ones."""
  old = json.loads((FIXTURES / "llama3" / "config.json").read_text())
  new = json.loads((FIXTURES / "qwen3" / "config.json").read_text())
  assert "rope_scaling" in old and "rope_parameters" not in old and "torch_dtype" in old
  assert "rope_parameters" in new and "rope_theta" not in new and "dtype" in new
  config = hf.decoder_config(old)
  assert config.rope_scaling == hf.RopeScaling("llama3", 8.0, 1.0, 4.0, 32)
  assert config.rope_theta == 100.0
  moved = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
  moved["rope_parameters"] = {"rope_theta": 100.0, **old["rope_scaling"]}
  assert hf.decoder_config(moved) == config
  qwen3 = hf.decoder_config(new)
  assert (qwen3.qk_norm, qwen3.tie_embeddings, qwen3.head_dim) == (True, True, 16)


@pytest.mark.parametrize("name", ["llama3", "qwen2", "qwen3", "llama_sharded"])
def test_load_save_gives_the_same_files(name, tmp_path):
  model, checkpoint = hf.load_hf(FIXTURES / name)
  hf.save_hf(model, checkpoint, tmp_path)
  written = sorted(p.name for p in tmp_path.iterdir())
  source = sorted(p.name for p in (FIXTURES / name).iterdir() if p.name != "reference.npz")
  assert written == source
  for file in written:  # config, index, tokenizer and every tensor byte for byte
    assert filecmp.cmp(tmp_path / file, FIXTURES / name / file, shallow=False), file
  got, want = tensors(tmp_path), tensors(FIXTURES / name)
  assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
    k: (v.shape, v.dtype) for k, v in want.items()
  }


def test_bfloat16(tmp_path):
  """A bf16 load computes close to float32, saves float32 tensors as float32, and a bf16
  checkpoint round-trips bit for bit."""
  model, checkpoint = hf.load_hf(FIXTURES / "qwen3", "bfloat16")
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}
  reference = np.load(FIXTURES / "qwen3" / "reference.npz")
  error = np.abs(logits(model, reference["tokens"]) - reference["logits_11"]).max()
  assert 1e-4 < error < 0.25, error
  hf.save_hf(model, checkpoint, tmp_path / "f32")
  assert {v.dtype for v in tensors(tmp_path / "f32").values()} == {np.dtype(np.float32)}
  bf16 = dataclasses.replace(checkpoint, dtypes=dict.fromkeys(checkpoint.dtypes, "bfloat16"))
  hf.save_hf(model, bf16, tmp_path / "bf16")
  stored = tensors(tmp_path / "bf16")
  assert {v.dtype.name for v in stored.values()} == {"bfloat16"}
  again, again_checkpoint = hf.load_hf(tmp_path / "bf16", "bfloat16")
  hf.save_hf(again, again_checkpoint, tmp_path / "bf16_again")
  for file in ("model.safetensors", "config.json"):
    assert filecmp.cmp(tmp_path / "bf16" / file, tmp_path / "bf16_again" / file, shallow=False)
  np.testing.assert_array_equal(
    np.asarray(again.blocks[0].attn.q_proj.kernel[...]).astype(np.float32),
    np.asarray(model.blocks[0].attn.q_proj.kernel[...]).astype(np.float32),
  )


def _smaller(model: Decoder, config: DecoderConfig) -> Decoder:
  """Block 1 of ``model`` alone, with KV head 1 (query heads 2, 3) and MLP neurons 24..47."""
  d = config.head_dim or config.dim // 4
  small = dataclasses.replace(config, depth=1, num_heads=2, num_kv_heads=1, head_dim=d, mlp_dim=24)
  out = small.make(nnx.Rngs(0))
  block, new = model.blocks[1], out.blocks[0]
  q, kv, mlp = slice(2 * d, 4 * d), slice(d, 2 * d), slice(24, 48)
  new.attn.q_proj.kernel[...] = block.attn.q_proj.kernel[:, q]
  new.attn.k_proj.kernel[...] = block.attn.k_proj.kernel[:, kv]
  new.attn.v_proj.kernel[...] = block.attn.v_proj.kernel[:, kv]
  if config.qkv_bias:
    new.attn.q_proj.bias[...] = block.attn.q_proj.bias[q]
    new.attn.k_proj.bias[...] = block.attn.k_proj.bias[kv]
    new.attn.v_proj.bias[...] = block.attn.v_proj.bias[kv]
  new.attn.o_proj.kernel[...] = block.attn.o_proj.kernel[q, :]
  for proj in ("gate_proj", "up_proj"):
    getattr(new.mlp, proj).kernel[...] = getattr(block.mlp, proj).kernel[:, mlp]
  new.mlp.down_proj.kernel[...] = block.mlp.down_proj.kernel[mlp, :]
  for norm in ("attn_norm", "mlp_norm"):
    getattr(new, norm).scale[...] = getattr(block, norm).scale[...]
  out.embed.embedding[...] = model.embed.embedding[...]
  out.norm.scale[...] = model.norm.scale[...]
  out.head.kernel[...] = model.head.kernel[...]
  return out


@pytest.mark.parametrize("name", ["qwen2", "llama_sharded"])
def test_uniform_structured_removal_and_dropped_block_update_the_config(name, tmp_path):
  model, checkpoint = hf.load_hf(FIXTURES / name)
  small = _smaller(model, checkpoint.config)
  hf.save_hf(small, checkpoint, tmp_path)
  written = json.loads((tmp_path / "config.json").read_text())
  fields = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")
  assert [written[f] for f in fields] == [1, 2, 1]
  assert (written["intermediate_size"], written["head_dim"]) == (24, 8)  # 32 / 2 heads != 8
  source = json.loads((FIXTURES / name / "config.json").read_text())
  assert {
    k: v for k, v in written.items() if k not in (*fields, "intermediate_size", "head_dim")
  } == {
    k: v
    for k, v in source.items()
    if k not in (*fields, "intermediate_size", "head_dim") and k != "layer_types"
  } | ({"layer_types": ["full_attention"]} if "layer_types" in source else {})
  stored = tensors(tmp_path)
  assert stored["model.layers.0.self_attn.q_proj.weight"].shape == (16, 32)  # [out, in]
  assert not any(".layers.1." in n for n in stored)
  np.testing.assert_array_equal(
    stored["model.layers.0.mlp.down_proj.weight"],
    np.asarray(model.blocks[1].mlp.down_proj.kernel[...])[24:].T,
  )
  if name == "llama_sharded":  # shards follow the source's: lm_head stays in the second
    index = json.loads((tmp_path / hf.INDEX).read_text())
    assert index["weight_map"]["lm_head.weight"] == "model-00002-of-00002.safetensors"
    assert set(index["weight_map"]) == set(stored)
  again, _ = hf.load_hf(tmp_path)
  tokens = np.load(FIXTURES / name / "reference.npz")["tokens"]
  np.testing.assert_array_equal(logits(again, tokens), logits(small, tokens))


def test_per_block_widths_are_an_error(tmp_path):
  model, checkpoint = hf.load_hf(FIXTURES / "mistral")
  ragged = dataclasses.replace(checkpoint.config, num_heads=(4, 2), num_kv_heads=(2, 1))
  other = nnx.eval_shape(lambda: ragged.make(nnx.Rngs(0)))
  with pytest.raises(
    hf.CheckpointError, match=r"one width for all layers.*num_attention_heads per block \[4, 2\]"
  ):
    hf.save_hf(other, checkpoint, tmp_path)
  assert not (tmp_path / "model.safetensors").exists()


def test_reader_errors(tmp_path):
  config = json.loads((FIXTURES / "qwen2" / "config.json").read_text())
  (tmp_path / "config.json").write_text(
    json.dumps({**config, "architectures": ["GPT2LMHeadModel"]})
  )
  with pytest.raises(
    hf.CheckpointError, match=r"config\.json: architectures \['GPT2LMHeadModel'\] is none of"
  ):
    hf.load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    hf.load_hf(tmp_path)
  (tmp_path / "model.safetensors").symlink_to(FIXTURES / "qwen2" / "model.safetensors")
  with pytest.raises(hf.CheckpointError, match=r"missing tensors \['model.layers.2"):
    hf.load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
  with pytest.raises(
    hf.CheckpointError,
    match=r"'model.layers.0.mlp.down_proj.weight' has shape \(32, 48\), config.json implies \(32, 40\)",
  ):
    hf.load_hf(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(
    hf.CheckpointError, match=r"model\.safetensors: not a readable safetensors file"
  ):
    hf.load_hf(tmp_path)
  with pytest.raises(ValueError, match="dtype must be one of"):
    hf.load_hf(FIXTURES / "qwen2", "float16")


def test_trained_charlm_round_trips_with_its_perplexity(tmp_path):
  corpus = np.frombuffer(text.topics_text()[:6000].encode("ascii", "replace"), np.uint8) % 64
  model = Decoder(64, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=48, rngs=nnx.Rngs(0))
  windows = hf_prune.windows(corpus.astype(np.int32), 33)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    def loss(p):
      out = nnx.merge(graphdef, p)(batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(out, batch[:, 1:]).mean()

    grads = jax.grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  for i in range(8):
    params, opt = step(params, opt, jnp.asarray(windows[8 * i : 8 * i + 8]))
  model = nnx.merge(graphdef, params)
  held_out = windows[-16:]
  before = hf_prune.perplexity(model, held_out)
  assert before < 40  # trained: below the uniform 64
  hf.save_hf(model, hf.new_checkpoint(config_of(model)), tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
  again, _ = hf.load_hf(tmp_path)
  assert hf_prune.perplexity(again, held_out) == before


def test_prune_command_end_to_end(tmp_path):
  words = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "sparse",
    "weights",
    "are",
    "zero",
  ]
  rng = np.random.default_rng(0)
  (tmp_path / "text.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(60)))
  out = tmp_path / "pruned"
  args = ["--checkpoint", str(FIXTURES / "qwen2"), "--text", str(tmp_path / "text.txt")]
  args += ["--method", "wanda", "--structure", "2:4", "--out", str(out)]
  args += ["--seq-len", "16", "--calibration", "8"]
  run = subprocess.run(
    [sys.executable, "-m", "jaxprune", "prune", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr
  lines = run.stdout.splitlines()
  assert any(line.startswith("dense perplexity: ") for line in lines), run.stdout
  assert [line.split(":")[0] for line in lines if line.startswith("block ")] == [
    "block 1/2",
    "block 2/2",
  ]
  assert "| wanda | 2:4 (50.0% measured) |" in run.stdout
  assert "blocks/1/mlp/down_proj/kernel  48x32" in run.stdout  # the per-layer table
  dense = float(lines[[line.startswith("| dense") for line in lines].index(True)].split("|")[3])
  assert dense > 1
  model, _ = hf.load_hf(out)
  for name in ("q_proj", "o_proj"):
    kernel = np.asarray(getattr(model.blocks[0].attn, name).kernel[...])
    zeros = (kernel.reshape(-1, 4, kernel.shape[1]) == 0).sum(axis=1)
    assert (zeros == 2).all()  # exactly 2 of every 4 consecutive inputs
  assert np.asarray(model.blocks[0].attn.q_proj.bias[...]).all()  # biases stay
  for file in ("config.json", "tokenizer.json"):  # config unchanged for N:M
    assert filecmp.cmp(out / file, FIXTURES / "qwen2" / file, shallow=False)


def test_prune_command_argument_errors(capsys, tmp_path):
  from jaxprune import cli

  (tmp_path / "short.txt").write_text("the fox")
  args = ["prune", "--checkpoint", str(FIXTURES / "qwen2"), "--out", str(tmp_path / "o")]
  with pytest.raises(SystemExit) as e:
    cli.main([*args, "--text", str(tmp_path / "short.txt")])
  assert e.value.code == 2
  assert f"--text {tmp_path / 'short.txt'}: 4 tokens leave 4 to calibrate on and 0 held out" in (
    capsys.readouterr().err
  )
  with pytest.raises(SystemExit):
    cli.main([*args, "--text", str(tmp_path / "missing.txt")])
  assert "missing.txt" in capsys.readouterr().err

  with pytest.raises(SystemExit) as e:
    cli.main(["prune", "--checkpoint", str(FIXTURES / "qwen2"), "--text", "t.txt"])
  assert e.value.code == 2
  assert "--checkpoint needs --text FILE and --out DIR" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["prune", "--checkpoint", "x", "--config", "y"])
  assert "not allowed with argument" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["prune", "--checkpoint", "x", "--text", "t", "--out", "o", "--structure", "4:2"])
  assert "0 < N < M" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["prune", "--checkpoint", "x", "--text", "t", "--out", "o", "--devices", "-1"])
  assert "--devices must be >= 0 (0: all local devices), got -1" in capsys.readouterr().err
  (tmp_path / "text.txt").write_text("the quick brown fox " * 20)
  more = jax.local_device_count() + 1  # before the checkpoint is read
  with pytest.raises(SystemExit) as e:
    cli.main([*args, "--text", str(tmp_path / "text.txt"), "--devices", str(more)])
  assert e.value.code == 2
  assert f"--devices {more}: this process sees {more - 1} local device(s)" in (
    capsys.readouterr().err
  )


def test_prune_blocks_magnitude_per_layer_and_n_m():
  """Magnitude (no calibration): per layer exactly round(s * n) of the smallest |w|; 2:4
  keeps the 2 largest of every 4 consecutive inputs; norms, biases, embeddings untouched."""
  model, _ = hf.load_hf(FIXTURES / "qwen2")
  before = {p: np.asarray(v) for p, v in jaxprune.tree.leaves_with_paths(nnx.state(model))}
  lines = []
  hf_prune.prune_blocks(
    model, [], method="magnitude", sparsity=0.3, structure=None, log=lines.append
  )
  assert [line.split(":")[0] for line in lines] == ["block 1/2", "block 2/2"]
  after = {p: np.asarray(v) for p, v in jaxprune.tree.leaves_with_paths(nnx.state(model))}
  for path, w in before.items():
    if not (path.startswith("blocks/") and w.ndim == 2):
      np.testing.assert_array_equal(after[path], w, err_msg=path)
      continue
    pruned = after[path] == 0
    assert pruned.sum() == round(0.3 * w.size), path
    assert np.abs(w[pruned]).max() <= np.abs(w[~pruned]).min(), path
  model, _ = hf.load_hf(FIXTURES / "qwen2")
  one = "^blocks/1/mlp/down_proj/"  # --layers: only this kernel
  nm = jaxprune.n_m(2, 4)
  hf_prune.prune_blocks(model, [], method="magnitude", sparsity=0.5, structure=nm, layers=one)
  w = before["blocks/1/mlp/down_proj/kernel"].reshape(12, 4, 32)  # groups of 4 inputs
  kept = np.asarray(model.blocks[1].mlp.down_proj.kernel[...]).reshape(12, 4, 32) != 0
  rank = np.argsort(np.argsort(-np.abs(w), axis=1, kind="stable"), axis=1)
  np.testing.assert_array_equal(kept, rank < 2)
  np.testing.assert_array_equal(
    np.asarray(model.blocks[0].mlp.down_proj.kernel[...]), before["blocks/0/mlp/down_proj/kernel"]
  )


def test_one_pass_on_a_tied_checkpoint_equals_the_traced_path():
  """The command's one pass per block (Decoder.stack: embed -> blocks -> tied logits) gives
  the Wanda masks of the traced block-by-block path, with one progress line per block."""
  tokens = np.random.default_rng(0).integers(0, 64, (2, 2, 7)).astype(np.int32)
  batches = [tokens[0], tokens[1]]
  model, checkpoint = hf.load_hf(FIXTURES / "qwen3")
  assert checkpoint.config.tie_embeddings
  lines = []
  hf_prune.prune_blocks(
    model, batches, method="wanda", sparsity=0.5, structure=None, log=lines.append
  )
  assert [line.split(":")[0] for line in lines] == ["block 1/2", "block 2/2"]
  one_pass = {p: np.asarray(v) for p, v in jaxprune.tree.leaves_with_paths(nnx.state(model))}
  reference, _ = hf.load_hf(FIXTURES / "qwen3")
  calls = []
  traced, _ = jaxprune.posttrain.prune(
    reference,
    None,
    batches,
    method="wanda",
    sparsity=0.5,
    blocks=["^blocks/0/", "^blocks/1/"],
    where=lambda path, leaf: path.startswith("blocks/") and path.endswith("kernel"),
    progress=lambda done, total: calls.append((done, total)),
  )
  assert calls == [(1, 2), (2, 2)]
  for path, w in jaxprune.tree.leaves_with_paths(traced):
    if path.startswith("blocks/") and path.endswith("kernel"):
      np.testing.assert_array_equal(one_pass[path] == 0, np.asarray(w) == 0, err_msg=path)
      assert (one_pass[path] == 0).mean() == 0.5, path


def test_prune_config_form_is_the_flag_form(capsys, tmp_path):
  """configs/hf_prune.py (with overrides) parses to the flags' arguments and writes the same
  checkpoint and report."""
  from jaxprune import cli
  from jaxprune.train import config as config_lib

  parser = cli.build_parser()
  flags = ["prune", "--checkpoint", str(FIXTURES / "llama3")]
  flags += ["--text", str(FIXTURES / "calibration.txt"), "--out", "runs/llama3_wanda_50"]
  flags += ["--method", "wanda", "--seq-len", "16", "--calibration", "8"]
  from_file = cli._checkpoint_form(
    parser,
    parser.parse_args(["prune", "--config", str(ROOT / "configs" / "hf_prune.py")]),
    config_lib.read_config(ROOT / "configs" / "hf_prune.py"),
    [],
  )
  assert vars(from_file) == vars(parser.parse_args(flags))
  reports = []
  for form, out in (("flags", tmp_path / "a"), ("config", tmp_path / "b")):
    if form == "flags":
      argv = [*flags[:-6], "--out", str(out), "--method", "magnitude", "--structure", "2:4"]
      argv += ["--seq-len", "16", "--calibration", "8"]
    else:
      argv = ["prune", "--config", str(ROOT / "configs" / "hf_prune.py")]
      argv += [f"--config.out={out}", "--config.method=magnitude", "--config.structure", "2:4"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    reports.append([x for x in lines if not x.startswith(("time", "pruned checkpoint", "block"))])
  assert reports[0] == reports[1]
  assert "| magnitude | 2:4 (50.0% measured) |" in "\n".join(reports[0])
  a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])


def test_prune_config_form_errors_are_the_flag_forms(capsys, tmp_path):
  from jaxprune import cli

  config = ["prune", "--config", str(ROOT / "configs" / "hf_prune.py")]
  cases = [
    (["--config.sparsity=1.5"], "error: --sparsity must be in [0, 1), got 1.5"),
    (["--config.method=foo"], "argument --method: invalid choice: 'foo'"),
    (["--config.structure=2:4", "--config.sparsity=0.6"], "not allowed with argument"),
    (["--config.sparsty=0.5"], "sparsty: unknown config field (did you mean 'sparsity'?)"),
    (["--method", "sparsegpt"], "--method goes with --checkpoint; with --config set config.method"),
  ]
  for extra, message in cases:
    with pytest.raises(SystemExit) as e:
      cli.main([*config, *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err, extra
  (tmp_path / "extra.py").write_text(
    "from jaxprune.train import hf_prune\n\n\ndef get_config():\n"
    "  config = hf_prune.default_config()\n  config.checkpoint = 'x'\n  config.steps = 3\n"
    "  return config\n"
  )
  with pytest.raises(SystemExit):
    cli.main(["prune", "--config", str(tmp_path / "extra.py")])
  assert "config.steps: not an option of jaxprune prune --checkpoint" in capsys.readouterr().err
