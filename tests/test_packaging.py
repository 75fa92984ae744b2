"""The core install: `pip install jaxprune` alone gives a working jaxprune and no extras.

One test builds a fresh venv, installs the package without extras (about 12 s of CPU
once pip's cache holds the wheels, which `make`'s own install fills) and runs a script
there. Deselect it with ``-m "not packaging"`` for a quick local run.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Distributions that belong to an extra and must not come with the core. (orbax-checkpoint
# is not listed: flax itself requires it.)
EXTRAS_ONLY = [
  "array-record",
  "matplotlib",
  "ml-collections",
  "mlxtend",
  "safetensors",
  "scikit-learn",
  "tensorboard",
  "tensorboardX",
  "tensorflow",
  "tensorflow-datasets",
  "tokenizers",
  "tqdm",
]

CORE_SCRIPT = textwrap.dedent(
  """
  import io
  import pathlib

  import jax.numpy as jnp
  import numpy as np
  import optax

  import sys

  import jaxprune

  assert (pathlib.Path(jaxprune.__file__).parent / "py.typed").is_file()  # PEP 561
  # jax.experimental.sparse (and scipy.sparse with it) only on first export: 0.4 s of import
  assert not {"jax.experimental.sparse", "scipy.sparse"} & set(sys.modules), "eager import"

  # The README's two lines.
  pruner = jaxprune.magnitude(jaxprune.agp(0.9, begin=1_000, end=10_000, every=100))
  tx = jaxprune.masked(optax.adam(1e-3), pruner)

  params = {"dense": {"kernel": jnp.arange(1.0, 21.0).reshape(4, 5), "bias": jnp.ones(5)}}
  opt_state = tx.init(params)
  opt_state = opt_state._replace(count=jnp.full_like(opt_state.count, 10_000))  # AGP's end
  grads = {"dense": {"kernel": jnp.ones((4, 5)), "bias": jnp.ones(5)}}
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  kernel = np.asarray(params["dense"]["kernel"])
  assert (kernel == 0.0).sum() == 18, kernel  # 90% of 20 weights, exactly zero
  assert (kernel[kernel != 0] > 18).all(), kernel  # the two largest are kept
  assert (np.asarray(params["dense"]["bias"]) != 0).all()  # biases are never pruned
  print(jaxprune.summary(params))

  import jaxprune.analysis
  import jaxprune.models
  import jaxprune.nn
  import jaxprune.surgery

  def fails(code, *needles):
    try:
      exec(code)
    except ImportError as e:
      assert all(n in str(e) for n in needles), str(e)
    else:
      raise AssertionError(f"{code!r} did not fail")

  fails("import jaxprune.train", "jaxprune.train needs the 'train' extra: pip install 'jaxprune[train]'")
  fails("import jaxprune.models.hf", "needs the 'llm' extra: pip install 'jaxprune[llm]'")
  fails(
    "jaxprune.analysis.plot_weight_histograms({'w': np.ones((4, 4))}, 'w.png')",
    "needs the 'plot' extra: pip install 'jaxprune[plot]'",
  )

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  from jaxprune import progress

  with progress.bar(total=100, desc="core", file=Terminal(), every=50) as bar:
    for _ in range(100):
      bar.update()
  text = bar.file.getvalue()
  assert "\\r" not in text and text.splitlines()[-1].startswith("core: 100% 100/100 ["), text
  print("core ok")
  """
)


def _run(*args, cwd=None):
  return subprocess.run(
    [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=900, check=False
  )


@pytest.mark.packaging
def test_the_core_install_works_without_extras(tmp_path):
  src = tmp_path / "src"  # a copy, so the build writes nothing into the checkout
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(
    ROOT / "jaxprune", src / "jaxprune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
  )
  venv = tmp_path / "venv"
  # A venv without its own pip (ensurepip alone takes seconds), filled by this interpreter's
  # pip through --python; --no-compile skips byte-compiling jax, scipy and friends (two
  # thirds of pip's time), the script below compiles only what it imports.
  made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
  assert made.returncode == 0, made.stderr
  python = venv / "bin" / "python"
  pip = [sys.executable, "-m", "pip", "--python", python]
  installed = _run(*pip, "install", "--quiet", "--no-compile", src)
  assert installed.returncode == 0, installed.stdout + installed.stderr

  listed = _run(*pip, "list", "--format=json")
  names = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
  assert {"jax", "flax", "optax", "numpy", "jaxprune"} <= names
  assert not names & {n.lower() for n in EXTRAS_ONLY}, sorted(names)

  ran = _run(python, "-c", CORE_SCRIPT, cwd=tmp_path)  # not the checkout: the installed copy
  assert ran.returncode == 0, ran.stdout + ran.stderr
  assert "core ok" in ran.stdout
