"""capture: one trace, the params' consumers by exact path, recorded values, and no
patched class (APoZ and BatchNorm folding look inside models without touching Flax)."""

import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import surgery
from jaxprune.analysis import apoz
from jaxprune.surgery import capture

KERNEL = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
BATCHES = [np.array([[-2.0], [1.0]], np.float32), np.array([[-1.0], [2.0], [0.5]], np.float32)]


def expected_apoz(kernel, bias):
  """APoZ of relu(x @ kernel + bias) per unit over BATCHES, in numpy."""
  y = np.concatenate([x @ kernel + bias for x in BATCHES])
  return (np.maximum(y, 0) == 0).mean(axis=0)


def library_calls():
  return {cls: cls.__dict__.get("__call__") for cls in (nnx.Conv, nnx.Linear, nnx.BatchNorm)}


class Gated(nnx.Module):
  """An MLP whose forward pass waits at ``gate`` (a callable) before its layers run."""

  def __init__(self, bias, gate, rngs):
    self.fc1 = nnx.Linear(1, 4, rngs=rngs)
    self.fc1.kernel[...] = KERNEL
    self.fc1.bias[...] = jnp.asarray(bias, jnp.float32)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.fc2 = nnx.Linear(4, 2, rngs=rngs)
    self.gate = gate

  def __call__(self, x):
    self.gate()
    return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def run_in_thread(fn):
  result = {}

  def target():
    try:
      result["value"] = fn()
    except BaseException as e:  # reported by the main thread
      result["error"] = e

  thread = threading.Thread(target=target)
  thread.start()
  return thread, result


@pytest.mark.parametrize("job", ["apoz", "fold_batchnorm", "plan"])
def test_no_class_is_patched_before_during_or_after(job):
  started, proceed = threading.Event(), threading.Event()

  def gate():
    started.set()
    assert proceed.wait(60)

  bias = np.array([-100.0, 100.0, 0.0, 0.0], np.float32)
  model = Gated(bias, gate, nnx.Rngs(0))
  model.eval()
  x = jnp.ones((1, 1))
  jobs = {
    "apoz": lambda: apoz(model, BATCHES, "fc1"),
    "fold_batchnorm": lambda: surgery.batchnorm_pairs(model, x),
    "plan": lambda: surgery.plan(model, example_input=x),
  }
  before = library_calls()
  user_class, user_types = Gated.__dict__["__call__"], (type(model.fc1), type(model.bn))
  thread, result = run_in_thread(jobs[job])
  try:
    assert started.wait(60)
    # the other thread is inside its trace now, its layers about to run
    assert library_calls() == before
    assert Gated.__dict__["__call__"] is user_class
    assert (type(model.fc1), type(model.bn)) == (nnx.Linear, nnx.BatchNorm) == user_types
    assert nnx.Linear(1, 4, rngs=nnx.Rngs(1))(x).shape == (1, 4)  # other users unaffected
  finally:
    proceed.set()
    thread.join(120)
  if "error" in result:
    raise result["error"]
  assert library_calls() == before
  assert Gated.__dict__["__call__"] is user_class
  assert (type(model.fc1), type(model.bn)) == user_types
  if job == "apoz":
    np.testing.assert_array_equal(result["value"]["fc1"], expected_apoz(KERNEL, bias))
  elif job == "fold_batchnorm":
    assert result["value"] == [("fc1", "bn")]


def test_concurrent_apoz_in_two_threads_counts_each_model_separately():
  barrier = threading.Barrier(2, timeout=60)
  biases = [np.array([-100.0, 100.0, 0.0, 0.0]), np.array([100.0, -100.0, 1.5, -0.5])]
  models = [Gated(b, barrier.wait, nnx.Rngs(i)) for i, b in enumerate(biases)]
  runs = [run_in_thread(lambda m=m: apoz(m, BATCHES, ["fc1", "fc2"])) for m in models]
  for thread, _ in runs:
    thread.join(120)
  for (_, result), bias in zip(runs, biases):
    if "error" in result:
      raise result["error"]
    np.testing.assert_array_equal(result["value"]["fc1"], expected_apoz(KERNEL, bias))
    assert result["value"]["fc2"].shape == (2,)


class Inner(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(6, 6, rngs=rngs)


class Consumers(nnx.Module):
  """Linear layers in every form: Dense, one inside jax.jit and remat, einsum, LinearGeneral."""

  def __init__(self, rngs):
    self.fc = nnx.Linear(4, 6, rngs=rngs)
    self.inner = Inner(rngs)
    self.w = nnx.Param(jax.random.normal(rngs.params(), (6, 5)))
    self.heads = nnx.LinearGeneral(5, (2, 3), rngs=rngs)

  def __call__(self, x):
    h = self.fc(x)
    kernel, bias = self.inner.fc.kernel[...], self.inner.fc.bias[...]
    h = jax.jit(jax.checkpoint(lambda h, k, b: jnp.tanh(h @ k + b)))(h, kernel, bias)
    h = jnp.einsum("bi,io->bo", h, self.w[...])
    return self.heads(h)


def test_param_consumers_are_matched_by_exact_path_through_calls():
  model = Consumers(nnx.Rngs(0))
  fn, state = capture.forward(model, None, {})
  traced = capture.trace(fn, state, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  found = [(c.path, c.operand, c.node.primitive) for c in capture.param_consumers(traced)]
  assert found == [
    ("fc/kernel", 1, "dot_general"),
    ("inner/fc/kernel", 1, "dot_general"),  # inside jit and remat, not "fc/kernel"
    ("w", 1, "dot_general"),
    ("heads/kernel", 1, "dot_general"),
  ]
  inside = capture.param_consumers(traced)[1].node.site
  assert len(inside) > 1  # the site goes into the sub-jaxpr


def test_evaluate_records_layer_inputs_and_outputs_eagerly_and_under_jit():
  model = Consumers(nnx.Rngs(0))
  fn, state = capture.forward(model, None, {})
  x = jax.random.normal(jax.random.key(1), (3, 4))
  traced = capture.trace(fn, state, x)
  sites = {c.node.site: c.path for c in capture.param_consumers(traced)}
  leaves = jax.tree.leaves(state)

  def run(leaves, x):
    outputs, records = capture.evaluate(traced, leaves, [x], lambda site, eqn: site in sites)
    return outputs, {sites[r.site]: (r.ins[0], r.outs[0]) for r in records}

  p = {k: np.asarray(v, np.float64) for k, v in zip(traced.paths, leaves)}
  h1 = np.asarray(x, np.float64) @ p["fc/kernel"] + p["fc/bias"]
  h2 = np.tanh(h1 @ p["inner/fc/kernel"] + p["inner/fc/bias"])
  for outputs, seen in (run(leaves, x), jax.jit(run)(leaves, x)):
    np.testing.assert_allclose(seen["inner/fc/kernel"][0], h1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seen["w"][0], h2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seen["w"][1], h2 @ p["w"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs[0], model(x), rtol=1e-5, atol=1e-5)


def test_marked_outputs_of_a_module_called_twice():
  class Twice(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(2, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc(x) + self.fc(2 * x)

  model = Twice(nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  def forward(state, x):
    merged = nnx.merge(graphdef, state)
    capture.mark_outputs({"fc": merged.fc})
    return merged(x)

  x = jnp.ones((1, 2))
  traced = capture.trace(forward, state, x)
  assert [m.path for m in traced.marks] == ["fc", "fc"]
  values = capture.marked_outputs(traced, jax.tree.leaves(state), [x])
  np.testing.assert_allclose(values["fc"][1], model.fc(2 * x), rtol=1e-6)
  assert type(model.fc) is nnx.Linear


def test_mark_outputs_only_inside_a_trace():
  with pytest.raises(RuntimeError, match="capture.trace"):
    capture.mark_outputs({"fc": nnx.Linear(1, 1, rngs=nnx.Rngs(0))})


def test_sub_jaxprs_are_looked_up_in_one_place():
  surgery_dir = pathlib.Path(surgery.__file__).parent
  for path in [*surgery_dir.glob("*.py"), surgery_dir.parent / "analysis" / "activation_zeros.py"]:
    text = path.read_text()
    if path.name != "capture.py":
      assert '"call_jaxpr"' not in text and '"fun_jaxpr"' not in text, path
      assert ".__call__ =" not in text and "setattr(cls" not in text, path


def test_shrink_sees_through_jit_and_remat():
  class Remat(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(3, 6, rngs=rngs)
      self.fc2 = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      h = jax.jit(jax.checkpoint(lambda h: nnx.relu(h)))(self.fc1(x))
      return self.fc2(h)

  model = Remat(nnx.Rngs(0))
  p = surgery.plan(model, example_input=jnp.ones((1, 3)))
  assert p.group("fc1/kernel").blocked is None
  small = surgery.shrink(model, remove={"fc1/kernel": [1, 4]}, example_input=jnp.ones((1, 3)))
  assert small.model.fc1.kernel.shape == (3, 4) and small.model.fc2.kernel.shape == (4, 2)
