"""The tutorial notebooks execute without errors.

Each ``notebooks/NN_*.py`` (jupytext percent format, the only source of the notebooks) is converted to a notebook
with jupytext and executed cell by cell with nbclient in a kernel running *this* interpreter (the venv's python),
with ``INTERP_NOTEBOOK_SMALL=1`` so every notebook picks its small configuration. Any cell error fails the test with
the cell's traceback. Nothing is written next to the notebooks.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from helpers import import_or_skip

# the [dev] extra: skipped without it locally, a failure under CI=true
jupytext = import_or_skip("jupytext", module_level=True)
nbformat = import_or_skip("nbformat", module_level=True)
nbclient = import_or_skip("nbclient", module_level=True)
import_or_skip("ipykernel", module_level=True)

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
#: The quickstart runs in the fast tier (a kernel and the library end to end); the others, ~13 s of a kernel each on
#: this machine, in the slow tier (`pytest -m slow`, which CI runs too).
NOTEBOOKS = [
    "01_quickstart.py",
    *(pytest.param(name, marks=pytest.mark.slow) for name in (
        "02_comparing_methods.py",
        "03_causal_tracing.py",
        "04_editing.py",
        "05_your_own_model.py",
    )),
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colours of IPython tracebacks
CELL_TIMEOUT = 600  # seconds per cell; the small configuration needs far less


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A ``python3`` kernelspec that runs this interpreter, first on JUPYTER_PATH.

    The kernelspec ipykernel installs in the venv says ``python``, which jupyter_client maps to the interpreter
    running the client; but a user-level ``python3`` spec (``~/.local/share/jupyter``) would win over it and could
    point anywhere. JUPYTER_PATH comes before every other location, so the kernel is always this venv's python.
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (interp venv)", "language": "python",
    }))
    return root


def test_every_notebook_is_tested():
    listed = {n if isinstance(n, str) else n.values[0] for n in NOTEBOOKS}
    assert listed == {p.name for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py")}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, kernel_env, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    path = NOTEBOOKS_DIR / name
    assert path.exists(), f"missing notebook source {path}"
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_env))
    monkeypatch.setenv("INTERP_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel shares the machine with the rest of the test run
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable

    nb = jupytext.read(path, fmt="py:percent")
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    assert n_code > 0 and any(c.cell_type == "markdown" for c in nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))  # which python ran it
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT, allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name}: a cell raised\n{ANSI.sub('', str(err))}", pytrace=False)
    seconds = time.perf_counter() - t0
    print(f"{name}: {n_code} code cells in {seconds:.1f} s")

    # every code cell ran, and the kernel was this interpreter
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code" and c.source.strip())
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert Path(printed.strip()) == Path(sys.executable)
