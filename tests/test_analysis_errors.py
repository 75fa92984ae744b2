"""The analysis entry points name the argument at fault and what they expected."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import analysis

PARAMS = {"fc1": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}


class Net(nnx.Module):
  def __init__(self):
    self.fc1 = nnx.Linear(2, 3, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return nnx.relu(self.fc1(x))


def test_apoz_errors():
  net, batch = Net(), [jnp.ones((2, 2))]
  with pytest.raises(ValueError, match=r"^`batches` is empty"):
    analysis.apoz(net, [], "fc1")
  with pytest.raises(
    ValueError, match=r"^layers: \['fc9'\] matches none of the model's layers: \['fc1'\]"
  ):
    analysis.apoz(net, batch, "fc9")
  with pytest.raises(ValueError, match=r"^layers: '\(' is not a valid regular expression"):
    analysis.apoz(net, batch, "(")
  with pytest.raises(ValueError, match=r"^`apoz_values` is empty"):
    analysis.apoz_masks(PARAMS, {}, 0.5)


def test_histogram_errors(tmp_path):
  with pytest.raises(
    ValueError, match=r"^bins must be an integer >= 1 \(the number of bins\), got 0"
  ):
    analysis.plot_weight_histograms({"a": PARAMS}, tmp_path / "w.png", bins=0)
  with pytest.raises(ValueError, match=r"^bins must be an integer >= 1"):
    analysis.plot_apoz_histogram({"fc1": np.array([0.5])}, tmp_path / "a.png", bins=2.5)
  with pytest.raises(ValueError, match=r"^apoz_values\['fc1'\] is empty"):
    analysis.plot_apoz_histogram({"fc1": np.array([])}, tmp_path / "a.png")
  with pytest.raises(ValueError, match=r"^apoz_values\['fc1'\] must be fractions .* found 1.5"):
    analysis.plot_apoz_histogram({"fc1": np.array([0.2, 1.5])}, tmp_path / "a.png")
  with pytest.raises(ValueError, match="selects none"):
    analysis.plot_weight_histograms({"a": PARAMS}, tmp_path / "w.png", where="conv")
  assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("grid, message", [
  ([], "`sparsities` is empty"),
  ("0.5", "`sparsities` must be a sequence of numbers in [0, 1), got '0.5'"),
  ([0.5, "0.9"], "`sparsities` must hold numbers in [0, 1); found '0.9'"),
  ([0.5, True], "found True"),
  ([0.5, 1.0], "must be in [0, 1)"),
])  # fmt: skip
def test_sensitivity_grid_errors(grid, message):
  with pytest.raises(ValueError) as e:
    analysis.sensitivity(PARAMS, lambda p: 1.0, grid, progress=False)
  assert message in str(e.value)


def test_sensitivity_evaluate_must_return_one_number():
  with pytest.raises(ValueError, match=r"`evaluate` must return one number .* shape \(3,\)"):
    analysis.sensitivity(PARAMS, lambda p: np.ones(3), [0.5], progress=False)
  with pytest.raises(ValueError, match=r"for fc1/kernel at sparsity 0.5 it returned str"):
    analysis.sensitivity(
      PARAMS, lambda p: 1.0 if p["fc1"]["kernel"].all() else "x", [0.5], progress=False
    )
  result = analysis.sensitivity(
    PARAMS, lambda p: jnp.float32(0.5), jnp.array([0.0, 0.5]), progress=False
  )
  assert result.accuracy["fc1/kernel"] == (0.5, 0.5)
