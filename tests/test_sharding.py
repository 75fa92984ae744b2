"""Sharded training on 8 simulated CPU devices equals single-device training.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax starts,
so the test runs this file as a script in a subprocess (``python tests/test_sharding.py``)
and checks the JSON it prints. Run it by hand to see the numbers.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

from jaxprune.train import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_fsdp_spec_shards_the_largest_divisible_axis():
  assert sharding.fsdp_spec((784, 300), 8) == sharding.PartitionSpec("data", None)
  assert sharding.fsdp_spec((300, 100), 4) == sharding.PartitionSpec("data", None)
  assert sharding.fsdp_spec((3, 3, 16, 64), 8) == sharding.PartitionSpec(None, None, None, "data")
  assert sharding.fsdp_spec((100, 10), 8, min_size=1) == sharding.PartitionSpec()  # none divides
  assert sharding.fsdp_spec((300,), 4) == sharding.PartitionSpec()  # vectors replicate
  assert sharding.fsdp_spec((16, 16), 8) == sharding.PartitionSpec()  # small: replicate
  assert sharding.fsdp_spec((784, 300), 1) == sharding.PartitionSpec()


def collectives(hlo: str) -> list[tuple[str, str, str]]:
  """``(op, result shape, jax op_name)`` of every collective in compiled HLO text."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all)(-start)?\(", line)
    if m:
      name = re.search(r'op_name="([^"]+)"', line)
      found.append((m.group(2), m.group(1), name.group(1) if name else ""))
  return found


def sharded_run() -> dict:
  """Trains the same recipe on 1 device, 8 (data parallel) and 8 with FSDP params."""
  import time

  import jax

  import jaxprune
  from jaxprune.train import config as config_lib
  from jaxprune.train import loop

  assert jax.device_count() == 8, jax.devices()
  out = {"runs": {}}
  results = {}
  for name, devices, fsdp in (("single", 1, False), ("data", 8, False), ("fsdp", 8, True)):
    config = config_lib.default_config()
    config.data.update(name="digits", batch_size=64, eval_batch_size=64)
    config.train.update(steps=12, eval_every=12, log_every=4, progress=False)
    config.prune.update(scope="global", sparsity=0.8, begin=0, end=8, every=4)
    config.parallel.update(devices=devices, shard_params=fsdp)
    started = time.perf_counter()
    result = loop.train(config)
    results[name] = result
    out["runs"][name] = {
      "seconds": time.perf_counter() - started,
      "accuracy": result.final_accuracy,
      "layout": sharding.describe(result.state),
    }
  single = results["single"]
  for name in ("data", "fsdp"):
    other = results[name]
    pairs = zip(jax.tree.leaves(single.state.params), jax.tree.leaves(other.state.params))
    out["runs"][name]["max_param_diff"] = max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs
    )
    masks = zip(
      jax.tree.leaves(jaxprune.masks_of(single.state.opt_state)),
      jax.tree.leaves(jaxprune.masks_of(other.state.opt_state)),
    )
    out["runs"][name]["masks_equal"] = all(np.array_equal(a, b) for a, b in masks)

  # Global top-k on FSDP-sharded params, compiled: which collectives does it need?
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  shapes = {"fc1": (784, 304), "fc2": (304, 96), "fc3": (96, 16)}
  params = {k: {"kernel": rng.normal(size=s).astype(np.float32)} for k, s in shapes.items()}
  shardings = sharding.state_shardings(params, mesh, shard_params=True)
  pruner = jaxprune.magnitude(0.9, scope="global")
  select = jax.jit(pruner.masks, out_shardings=shardings)
  sharded = jax.device_put(params, shardings)
  out["topk_collectives"] = collectives(select.lower(sharded).compile().as_text())
  masks = select(sharded)
  expected = pruner.masks(params)
  out["topk_masks_equal"] = all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(expected))
  )
  out["topk_masks_sharded"] = sharding.describe(masks)
  return out


def run_on_8_devices() -> dict:
  # The tests' quick-compile flags (conftest) stay; 8 simulated devices are added to them.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = {**os.environ, "XLA_FLAGS": flags.strip()}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, __file__], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# One test, one subprocess (a module fixture would re-run on each pytest-xdist worker).
def test_sharded_training_matches_one_device():
  report = run_on_8_devices()
  runs = report["runs"]
  for name in ("data", "fsdp"):
    assert runs[name]["masks_equal"], name
    assert runs[name]["max_param_diff"] < 1e-4, (name, runs[name]["max_param_diff"])
    assert abs(runs[name]["accuracy"] - runs["single"]["accuracy"]) <= 2 / 297
  assert runs["single"]["layout"] == {} and runs["data"]["layout"] == {}  # replicated

  # FSDP shards each param, its Adam moments and its mask alike
  assert runs["fsdp"]["layout"] == {
    "params/fc1/kernel": "P('data', None)",  # 64x300: 64 % 8 == 0
    "opt_state/inner_state/0/mu/fc1/kernel": "P('data', None)",  # Adam moments
    "opt_state/inner_state/0/nu/fc1/kernel": "P('data', None)",
    "opt_state/masks/fc1/kernel": "P('data', None)",  # the mask
  }  # 300x100 and 100x10: no axis divides by 8, so replicated

  # Global top-k on sharded params gathers no params
  assert report["topk_masks_equal"]
  assert report["topk_masks_sharded"]["fc1/kernel"] == "P('data', None)"
  ops = report["topk_collectives"]
  # The selection reduces 2^16-bin histograms and counts across devices ...
  assert any(op == "all-reduce" and "scatter-add" in name for op, _, name in ops)
  # ... and never gathers a float array (the params or their scores).
  assert not any(op == "all-gather" and shape.startswith("f32") for op, shape, _ in ops)
  # The only gathers are of tie indicators (bool or int), in the branch that breaks ties
  # at the threshold by position, which runs only when such ties exist (lax.cond).
  for op, shape, name in ops:
    if op == "all-gather":
      assert "/cond/branch" in name and shape.startswith(("pred", "s32")), (shape, name)


if __name__ == "__main__":
  print(json.dumps(sharded_run()))
