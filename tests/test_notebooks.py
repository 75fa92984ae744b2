"""Every notebook in colabs/ runs top to bottom, and is stored without outputs.

Each notebook reads ``JAXPRUNE_QUICK=1`` (set here) in its parameters cell and runs tiny
step counts, so a notebook takes under a minute; a new notebook is picked up by the glob. The kernel is this interpreter
(``sys.executable``) through a kernel spec written to a temporary folder: the test needs
no globally installed kernel and cannot pick up another Python by accident.
"""

import json
import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
CELL_TIMEOUT = 900  # seconds, per cell: generous, so a busy machine does not fail a cell
KERNEL = "jaxprune-tests"


def test_there_are_notebooks():
  assert NOTEBOOKS, "no notebooks found in colabs/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs_and_reads_quick(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
  assert "JAXPRUNE_QUICK" in code, (
    f"{path.name}: read JAXPRUNE_QUICK in a parameters cell and use tiny step counts "
    "when it is '1' (the test runs every notebook that way)."
  )
  dirty = [
    i
    for i, cell in enumerate(nb.cells)
    if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
  ]
  assert not dirty, (
    f"{path.name}: cells {dirty} have outputs or execution counts; strip them "
    "(e.g. jupyter nbconvert --clear-output --inplace)."
  )


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
  """Kernel managers that start ``sys.executable -m ipykernel_launcher``."""
  kernels = tmp_path_factory.mktemp("jupyter") / "kernels"
  spec_dir = kernels / KERNEL
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "jaxprune tests",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))

  def make():
    specs = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)

  return make


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_top_to_bottom(path, kernel_manager_factory):
  nb = nbformat.read(path, as_version=4)
  paths = [str(ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
  # Less LLVM optimisation: tiny step counts are dominated by XLA compiles (~25% faster).
  xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
  env = dict(
    os.environ,
    JAXPRUNE_QUICK="1",
    PYTHONPATH=os.pathsep.join(p for p in paths if p),
    XLA_FLAGS=xla_flags,
  )
  env.pop("MPLBACKEND", None)  # the kernel's inline backend, as in a notebook
  client = nbclient.NotebookClient(
    nb,
    km=kernel_manager_factory(),
    timeout=CELL_TIMEOUT,
    resources={"metadata": {"path": str(path.parent)}},
  )
  client.execute(env=env)  # raises CellExecutionError, naming the cell, on any error
