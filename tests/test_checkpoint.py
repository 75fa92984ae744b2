import dataclasses
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.train import checkpoint, data, loop, metrics
from jaxprune.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
AGP = str(ROOT / "configs" / "lenet300_agp.py")


# --- the checkpointer -----------------------------------------------------------------


def test_keeps_the_newest_and_preserved_steps(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, every=5, keep=2, preserve=(10,))
  tree = {"w": jnp.arange(4.0), "masks": {"w": jnp.ones(4, bool), "b": None}}
  for step in range(1, 31):
    ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, tree), {"step": step})
  ckpt.save(33, tree, {"step": 33}, force=True)
  ckpt.wait()
  assert ckpt.steps() == [10, 30, 33] and ckpt.latest() == 33
  state, meta = ckpt.restore(tree, step=10)
  np.testing.assert_array_equal(state["w"], np.arange(4.0) + 10)
  assert state["masks"]["b"] is None and state["masks"]["w"].dtype == bool
  assert meta == {"step": 10}
  with pytest.raises(FileNotFoundError, match="No checkpoint 12"):
    ckpt.restore(tree, step=12)
  ckpt.close()
  assert not any(".orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir())


def test_meta_is_what_it_was_when_save_was_called(tmp_path):
  """A save is asynchronous: the training loop goes on appending to the history it passed
  as meta. The checkpoint holds the history of its own step (a later record in it was
  logged twice after a resume: a flaky lottery resume test under load)."""
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=3)
  history = [{"step": 1}]
  meta = {"history": history, "extra": {"window": [1.0]}}
  ckpt.save(1, {"w": jnp.ones(3)}, meta)
  history.append({"step": 2})  # what the loop does right after
  meta["extra"]["window"].append(2.0)
  ckpt.wait()
  _, got = ckpt.restore({"w": jnp.ones(3)})
  assert got == {"history": [{"step": 1}], "extra": {"window": [1.0]}}
  with pytest.raises(TypeError, match="meta of checkpoint 2 .* JSON"):
    ckpt.save(2, {"w": jnp.ones(3)}, {"array": np.ones(2)})
  ckpt.close()


def test_read_only_creates_nothing(tmp_path):
  """eval / export / shrink / prune read checkpoints: a missing directory is not created."""
  with pytest.raises(FileNotFoundError, match="No checkpoint in .*none: there is no such dir"):
    checkpoint.Checkpointer(tmp_path / "none", every=1, keep=1, read_only=True)
  assert list(tmp_path.iterdir()) == []


def test_restore_places_arrays_on_the_template_sharding(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1)
  ckpt.save(1, {"w": jnp.ones((4, 2))}, {})
  ckpt.wait()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  template = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=sharding)}
  state, _ = ckpt.restore(template)
  assert state["w"].sharding == sharding
  ckpt.close()


def test_metrics_writer_drops_rows_after_the_resumed_checkpoint(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    for step in (5, 10, 15):
      w.write({"phase": "train", "step": step, "global_step": step, "loss": 1.0 / step})
  with metrics.MetricsWriter(tmp_path, resume_step=10, tensorboard=False) as w:
    w.write({"phase": "train", "step": 15, "global_step": 15, "loss": 0.5})
  rows = metrics.read_csv(tmp_path)
  assert [(r["step"], r["loss"]) for r in rows] == [(5, 0.2), (10, 0.1), (15, 0.5)]
  with pytest.raises(KeyError, match="Unknown metric columns"):
    metrics.MetricsWriter(tmp_path / "x", tensorboard=False).write({"phase": "a", "acc": 1})


# --- resuming a run -------------------------------------------------------------------


class Interrupted(Exception):
  pass


@dataclasses.dataclass
class Interrupting:
  """A training split that raises after ``limit`` batches: a run dying mid-way."""

  split: data.Split
  limit: int
  taken: int = 0

  def __len__(self):
    return len(self.split)

  def take(self, indices):
    self.taken += 1
    if self.taken > self.limit:
      raise Interrupted
    return self.split.take(indices)


def tiny_rethink_config(workdir):
  config = config_lib.load_config(ROOT / "configs" / "lenet300_rethink.py")
  config.data.update(name="digits", batch_size=100, eval_batch_size=300)
  config.train.update(steps=8, eval_every=4, log_every=2, progress=False, workdir=str(workdir))
  config.prune.begin = 4
  config.rethink.steps = 8
  config.checkpoint.every = 3
  return config


def test_resume_inside_the_rethink_phase_matches_an_uninterrupted_run(tmp_path):
  whole = loop.train(tiny_rethink_config(tmp_path / "whole"))
  digits = data.load("digits")
  config = tiny_rethink_config(tmp_path / "cut")
  broken = dataclasses.replace(digits, train=Interrupting(digits.train, limit=13))
  with pytest.raises(Interrupted):  # dies at rethink step 5: last checkpoint at global 12
    loop.train(config, dataset=broken)
  resumed = loop.train(config)
  assert resumed.resumed_from == 12
  for a, b in ((whole.state, resumed.state), (whole.rethink.state, resumed.rethink.state)):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  assert resumed.history == whole.history and resumed.rethink.history == whole.rethink.history
  assert metrics.read_csv(tmp_path / "cut") == metrics.read_csv(tmp_path / "whole")
  again = loop.train(config)  # finished: restores the end and trains no more
  assert again.resumed_from == 16 and again.rethink.final_accuracy == whole.rethink.final_accuracy
  config.prune.sparsity = 0.5  # another run's checkpoints are refused
  with pytest.raises(config_lib.ConfigError, match="prune: checkpoint.dir .* holds a run with"):
    loop.train(config)


DIE_AT_16 = """
import os, signal, sys
from jaxprune import cli
from jaxprune.train import checkpoint

save = checkpoint.Checkpointer.save


def save_or_die(self, step, *args, **kwargs):
  if step == 16:
    self.wait()  # checkpoint 8 is on disk; steps 9-16 were trained and are lost
    os.kill(os.getpid(), signal.SIGKILL)
  return save(self, step, *args, **kwargs)


checkpoint.Checkpointer.save = save_or_die
sys.exit(cli.main(sys.argv[1:]))
"""


def command(workdir):
  return [
    sys.executable, "-m", "jaxprune", "train", "--config", AGP,
    "--config.data.name=digits", "--config.data.batch_size=64",
    "--config.train.steps=160", "--config.train.eval_every=80", "--config.train.log_every=20",
    "--config.train.progress=False", "--config.checkpoint.every=8",
    f"--config.train.workdir={workdir}",
  ]  # fmt: skip


def test_kill_9_then_the_same_command_resumes_bitwise(tmp_path):
  # A shared compilation cache: the second and third processes skip XLA compilation.
  env = {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }
  run = {"cwd": ROOT, "env": env, "capture_output": True, "text": True, "timeout": 900}
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  done = subprocess.run(command(whole), **run)
  assert done.returncode == 0, done.stderr[-2000:]
  out = done.stdout  # `python -m jaxprune train` prints what it does and what it got
  assert "jaxprune: lenet300 on digits, 160 steps, pruning: magnitude (layer), agp" in out
  assert "dense accuracy: " in out and "(step 59)" in out and "final accuracy: " in out
  assert "fc1/kernel  64x300   19,200  17,280    90.00%" in out and "total" in out
  assert f"report: {whole}/report.md" in out

  # The process kills itself with SIGKILL when it reaches checkpoint 16, after checkpoint
  # 8 is complete and 8 more steps were trained: deterministic on a busy machine (a
  # polling parent could miss the window and find the run finished).
  killed = subprocess.run([sys.executable, "-c", DIE_AT_16, *command(cut)[3:]], **run)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert (cut / "checkpoints" / "8").is_dir() and not (cut / "checkpoints" / "16").exists()
  assert not (cut / "params.npz").exists(), "the run finished before it was killed"

  resumed = subprocess.run(command(cut), **run)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from checkpoint step 8" in resumed.stdout
  a, b = np.load(whole / "params.npz"), np.load(cut / "params.npz")
  assert sorted(a) == sorted(b) and "params/fc1/kernel" in a
  for key in a:
    assert np.array_equal(a[key], b[key]), key  # bit for bit
  assert (whole / "metrics.csv").read_text() == (cut / "metrics.csv").read_text()
