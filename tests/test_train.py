import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.train import config as config_lib
from jaxprune.train import data, loop, metrics, models, optim, report, structured

ROOT = pathlib.Path(__file__).resolve().parents[1]
# autopruner has its own runner; charlm_{magnitude,wanda,sparsegpt} are `jaxprune prune`
# recipes over charlm's run (tests/test_charlm.py runs them); hf_prune is `jaxprune prune
# --config` over a Hugging Face checkpoint (tests/test_hf.py runs it).
RECIPES = sorted(
  p
  for p in (ROOT / "configs").glob("*.py")
  if p.stem not in ("autopruner", "hf_prune") and not p.stem.startswith("charlm_")
)

# --- pruner from config ---------------------------------------------------------------


def config_with(**fields):
  config = config_lib.default_config()
  for field, value in fields.items():
    group, name = field.split("__")
    config[group][name] = value
  return config


@pytest.mark.parametrize("method", ["magnitude", "random", "saliency"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_make_pruner_follows_the_config(method, scope):
  config = config_with(prune__method=method, prune__scope=scope, prune__dense_last=True)
  pruner = optim.make_pruner(config)
  assert pruner.scope == scope and pruner.dense_last
  assert pruner.needs_grads == (method == "saliency")
  assert pruner.score is getattr(jaxprune.scores, method)
  assert optim.make_pruner(config_with(prune__method="none")) is None


@pytest.mark.parametrize("schedule, expected", [
  ("agp", {999: 0.0, 1000: 0.0, 1100: 0.2439, 2000: 0.9, 2999: 0.9}),
  ("one_shot", {999: 0.0, 1000: 0.9, 2999: 0.9}),
  ("constant", {0: 0.9, 2999: 0.9}),
  ("iterative", {999: 0.0, 1000: 0.5358, 1100: 0.7846, 1199: 0.7846, 1200: 0.9}),
])  # fmt: skip
def test_make_schedule(schedule, expected):
  s = optim.make_schedule(config_with(prune__schedule=schedule))
  got = {t: round(float(s.sparsity(t)), 4) for t in expected}
  assert got == expected


@pytest.mark.parametrize("structure", ["neurons", "filters", "channels"])
def test_make_pruner_passes_the_structure(structure):
  pruner = optim.make_pruner(config_with(prune__structure=structure))
  assert type(pruner.structure).__name__ == "Axis"


def test_frozen_pruner_never_updates():
  pruner = optim.frozen(optim.make_pruner(config_with(prune__schedule="one_shot")))
  assert not any(bool(pruner.is_update(t)) for t in (0, 1000, 2999))
  assert float(pruner.schedule.sparsity(0)) == pytest.approx(0.9)


@pytest.mark.parametrize("schedule, warmup, expected", [
  ("constant", 0, {0: 0.1, 50: 0.1, 99: 0.1}),
  ("constant", 10, {0: 0.0, 5: 0.05, 10: 0.1, 99: 0.1}),
  ("cosine", 0, {0: 0.1, 50: 0.05, 100: 0.0}),
])  # fmt: skip
def test_learning_rate_schedules(schedule, warmup, expected):
  config = config_with(train__lr_schedule=schedule, train__warmup_steps=warmup)
  config.train.learning_rate = 0.1
  lr = optim.make_learning_rate(config, 100)
  assert {t: round(float(lr(t)), 4) for t in expected} == expected


# --- training -------------------------------------------------------------------------


def small(config, steps, **train):
  if config.model.name == "charlm":  # a tiny language model on its text
    config.model.update(dim=16, depth=1, mlp_dim=32)
    config.data.update(seq_len=16, batch_size=8, eval_batch_size=512)
    # its recipe trains into runs/charlm (where the prune recipes read it): not here
    config.train.update(
      {"warmup_steps": 1, "workdir": "", "steps": steps, "progress": False, **train}
    )
    return config
  config.data.update(name="digits", batch_size=64, eval_batch_size=128)
  config.train.update(steps=steps, progress=False, **train)
  return config


def agp_config():
  config = small(config_lib.default_config(), 60, eval_every=20, log_every=10)
  config.prune.update(begin=20, end=40, every=5, sparsity=0.75)
  config.prune.overrides = {"fc3": 0.5}
  return config


# One run checked from every side (module fixtures re-run on each pytest-xdist worker).
def test_agp_run_trains_prunes_logs_and_repeats():
  result = loop.train(agp_config())
  # training works
  losses = [h["loss"] for h in result.history if h.get("loss") is not None]
  assert losses[1] < losses[0] and losses[-1] < 0.6 * losses[0]
  assert result.dense_accuracy > 0.6 and result.final_accuracy > 0.6
  # exact sparsity, in the params and the masks
  s = result.summary
  assert [r.path for r in s.rows] == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
  assert (s["fc1/kernel"].zeros, s["fc2/kernel"].zeros, s["fc3/kernel"].zeros) == (
    14_400, 22_500, 500,
  )  # fmt: skip
  masks = jaxprune.summary(jaxprune.masks_of(result.state.opt_state))
  assert masks["fc1/kernel"].zeros == 14_400 and masks["fc3/kernel"].zeros == 500
  model = result.model()
  assert float(np.mean(np.asarray(model.fc2.kernel[...]) == 0)) == 0.75
  assert model(jnp.zeros((1, 8, 8, 1))).shape == (1, 10)
  # the dense accuracy is measured just before the first pruning step
  assert result.dense_step == 25  # agp is 0 at begin=20, first > 0 at 25
  evals = {h["step"]: h for h in result.history if h.get("test_accuracy") is not None}
  assert sorted(evals) == [20, 25, 40, 60]
  assert evals[25]["test_accuracy"] == result.dense_accuracy and evals[25]["sparsity"] == 0
  assert evals[60]["sparsity"] == pytest.approx((14_400 + 22_500 + 500) / 50_200)
  # every metric is logged every log_every steps
  logged = [h for h in result.history if h.get("loss") is not None]
  assert [h["step"] for h in logged] == [10, 20, 30, 40, 50, 60]
  last = logged[-1]
  assert last["phase"] == "train" and last["global_step"] == 60
  assert last["epoch"] == pytest.approx(60 / (1500 // 64), abs=1e-4)
  assert last["learning_rate"] == pytest.approx(1e-3) and 0 < last["train_accuracy"] <= 1
  assert last["target_sparsity"] == pytest.approx(0.75)  # the main schedule's target
  assert logged[1]["sparsity"] == 0 < logged[2]["sparsity"] < logged[3]["sparsity"]
  # the printed report
  text = result.report()
  assert "dense accuracy:" in text and "(step 25)" in text and "final accuracy:" in text
  assert "fc3/kernel" in text and "50.00%" in text
  text = dataclasses.replace(result, dense_accuracy=None).report()
  assert "dense accuracy: n/a (pruned from step 0)" in text
  # the same seed gives the same params, bit for bit
  again = loop.train(agp_config())
  jax.tree.map(np.testing.assert_array_equal, result.state, again.state)
  assert again.history == result.history


def test_conv_net_with_batchnorm_trains_and_evaluates_in_eval_mode():
  config = small(config_lib.default_config(), 6, eval_every=6, log_every=3)
  config.model.update(name="vgg_small", width=0.25)
  config.prune.update(schedule="one_shot", begin=3, sparsity=0.5, dense_last=True)
  result = loop.train(config)
  mean = result.state.rest["features"][0]["bn"]["mean"][...]  # initialised to zeros
  assert mean.shape == (4,) and np.all(mean != 0)  # the running statistics moved
  assert [r.path for r in result.summary.rows] == [f"features/{i}/conv/kernel" for i in range(3)]
  assert result.summary.sparsity == pytest.approx(0.5, abs=1e-3)
  assert result.model().features[0].bn.use_running_average


def test_train_step_is_reusable_and_pure():
  model = models.create("lenet300", (8, 8, 1), 10)
  tx = optim.make_optimizer(config_with(prune__schedule="constant"), None)
  graphdef, state = loop.init_state(model, tx, seed=0)
  step = jax.jit(loop.make_train_step(graphdef, tx, measured=("fc1/kernel",)))
  x, y = next(data.batches(data.load("digits").train, 32, seed=0, epoch=0))
  a, metrics_a = step(state, x, y)
  b, metrics_b = step(state, x, y)
  assert float(metrics_a["loss"]) == float(metrics_b["loss"]) and int(a.step) == 1
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a.rng, state.rng)
  assert float(metrics_a["sparsity"]) == 0.0


def check_rethink(config, result, workdir):
  """The from-scratch phase and the files of a run of ``configs/lenet300_rethink.py``."""
  fine_tuned, scratch = result.state, result.rethink.state
  masks = jaxprune.masks_of(fine_tuned.opt_state)
  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(jaxprune.masks_of(scratch.opt_state))):
    np.testing.assert_array_equal(a, b)  # the same masks ...
  for path in ("fc1", "fc2", "fc3"):
    # NumPy copies: boolean indexing of a jax.Array compiles a gather per mask
    w = np.asarray(scratch.params[path]["kernel"][...])
    w0 = np.asarray(fine_tuned.params[path]["kernel"][...])
    m = np.asarray(masks[path]["kernel"][...])
    assert np.all(w[~m] == 0) and not np.allclose(w[m], w0[m])  # ... on other weights
  assert result.rethink.summary.sparsity == result.summary.sparsity
  steps = config.train.steps
  assert [h["global_step"] for h in result.rethink.history if h.get("loss")] == [
    steps + 5, steps + 10,
  ]  # fmt: skip
  assert "from scratch (rethinking, same masks, re-initialised):" in result.report()

  names = {p.name for p in workdir.iterdir()}
  assert {"metrics.csv", "tensorboard", "config.json", "summary.json", "params.npz"} <= names
  assert {"params_rethink.npz", "report.md", "checkpoints", *report.PLOTS.values()} <= names
  rows = metrics.read_csv(workdir)
  assert [r["global_step"] for r in rows if r["loss"] is not None] == [5, 10, 15, 20, 25, 30]
  assert {r["phase"] for r in rows} == {"train", "rethink"}
  params = np.load(workdir / "params.npz")
  np.testing.assert_array_equal(
    params["params/fc2/kernel"], fine_tuned.params["fc2"]["kernel"][...]
  )
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["final_accuracy"] == result.final_accuracy
  assert summary["rethink"]["final_accuracy"] == result.rethink.final_accuracy
  text = (workdir / "report.md").read_text()
  assert "| pruned + fine-tuned (step 20) |" in text and "from scratch (10 steps)" in text
  assert "Liu et al. (2019)" in text and "The masks here are unstructured" in text
  assert "| `fc1/kernel` | 64x300 | 19,200 | 17,280 | 90.00% |" in text
  for png in report.PLOTS.values():
    assert f"]({png})" in text and (workdir / png).read_bytes()[:4] == b"\x89PNG"

  copy = workdir / "copy"  # `jaxprune report` needs only these two files
  copy.mkdir()
  for name in ("summary.json", "metrics.csv"):
    (copy / name).write_bytes((workdir / name).read_bytes())
  expected = text.replace(str(workdir), str(copy))
  assert report.write_report(copy).read_text() == expected
  with pytest.raises(FileNotFoundError, match="not the workdir of a finished"):
    report.write_report(workdir / "missing")


# --- every recipe ---------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_runs_a_few_steps(path, tmp_path):
  config = config_lib.load_config(path)
  if config.rethink.enabled:  # also checks the workdir outputs
    small(config, 20, eval_every=10, log_every=5, workdir=str(tmp_path))
    config.prune.begin = 10
    config.rethink.steps = 10
    config.checkpoint.every = 10
  else:
    small(config, 6, eval_every=6, log_every=3)
    config.prune.update(begin=2, end=4, every=1)
  result = loop.train(config)
  assert 0 <= result.final_accuracy <= 1
  assert (result.rethink is not None) == config.rethink.enabled
  if structured.is_channel_method(config):  # whole channels: filter, BatchNorm, consumer
    masks = jaxprune.masks_of(result.state.opt_state)
    for mask, w in zip(jax.tree.leaves(masks), jax.tree.leaves(result.state.params)):
      mask, w = np.asarray(mask), np.asarray(w)  # NumPy: jax.Array[mask] compiles per shape
      assert mask.dtype == bool and mask.shape == w.shape and not np.any(w[~mask])
    for i in range(3):
      filters = np.asarray(masks["features"][i]["conv"]["kernel"]).reshape(
        -1, masks["features"][i]["conv"]["kernel"].shape[-1]
      )
      kept = filters.any(0)
      assert np.array_equal(np.asarray(masks["features"][i]["bn"]["scale"]), kept)
      assert np.array_equal(np.asarray(masks["features"][i]["bn"]["bias"]), kept)
    if config.prune.method in ("slimming", "apoz"):  # a fixed fraction of channels
      assert result.summary.sparsity > 0
  elif config.prune.method == "none":  # dense: all kernels reported, the final accuracy
    assert result.dense_step == 6 and result.dense_accuracy == result.final_accuracy
    kernels = [r.path for r in result.summary.rows]
    if config.model.name == "charlm":  # every projection, the embeddings and the head
      assert len(kernels) == 9 and kernels[-2:] == ["embed/embedding", "head/kernel"]
    else:
      assert kernels == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
    assert result.summary.sparsity < 0.01
  else:
    assert result.summary.sparsity == pytest.approx(config.prune.sparsity, abs=0.02)
  if config.rethink.enabled and config.prune.schedule != "lottery":  # lottery: test_lottery.py
    check_rethink(config, result, tmp_path)
