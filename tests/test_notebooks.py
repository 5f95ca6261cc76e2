"""The notebooks (notebooks/*.ipynb) run top to bottom, so they cannot rot, and are committed without outputs.

Each notebook runs in a fresh python3 kernel of this interpreter (nbclient), from notebooks/ (where Jupyter starts
it), with NOTEBOOK_QUICK=1 (tiny settings) and checkpoints of tiny models trained once per session through the
command line. A notebook gets the checkpoint whose environment variable its source mentions: NOTEBOOK_CHECKPOINT
(fashion_mnist.yaml) or NOTEBOOK_COND_CHECKPOINT (fashion_mnist_cond.yaml, class-conditional).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.data import DATASETS

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

needs_fashion_mnist = pytest.mark.skipif(
    not any(Path(d).is_dir() for d in DATASETS["fashion_mnist"].system_dirs),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)

# One intra-op thread: on a small busy machine torch's thread pool spin-waits make tiny models 10x slower or worse.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# A tiny network trained for a few dozen steps: enough for every cell to run; the pictures are noise.
TINY_TRAINING = [
    "--model.net.init_args.base_channels", "8",
    "--model.net.init_args.norm_groups", "4",
    "--trainer.max_steps", "60",
    "--data.batch_size", "16",
    "--trainer.limit_val_batches", "0",
    "--logger_backend", "csv",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    # The checkpoint only: the sample-grid callback would spend more time than the training.
    "--trainer.callbacks", json.dumps([
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True, "save_top_k": 0}}
    ]),
]  # fmt: skip


def _train_tiny(config: str, root: Path) -> Path:
    command = [sys.executable, "-m", "src.main", "fit", "--config", str(REPO / "configs" / f"{config}.yaml"),
               "--trainer.default_root_dir", str(root), *TINY_TRAINING]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env={**os.environ, **SINGLE_THREAD}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = root.glob(f"{config}/version_*/checkpoints/last.ckpt")
    return checkpoint


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("notebook_runs")


@pytest.fixture(scope="session")
def tiny_checkpoint(notebook_runs: Path) -> Path:
    return _train_tiny("fashion_mnist", notebook_runs)


@pytest.fixture(scope="session")
def tiny_cond_checkpoint(notebook_runs: Path) -> Path:
    return _train_tiny("fashion_mnist_cond", notebook_runs)


# The environment variable a notebook reads its checkpoint from -> the fixture that trains it (only when needed).
CHECKPOINT_FIXTURES = {"NOTEBOOK_CHECKPOINT": "tiny_checkpoint", "NOTEBOOK_COND_CHECKPOINT": "tiny_cond_checkpoint"}


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if "__pycache__" not in p.parts} if folder.is_dir() else set()


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 4, f"expected the four notebooks in {NOTEBOOK_DIR}, found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", []), f"{path.name}: the first code cell holds parameters"
    assert "NOTEBOOK_QUICK" in first_code.source, f"{path.name}: the parameters cell reads NOTEBOOK_QUICK"


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(
    path: Path, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nbclient = pytest.importorskip("nbclient")
    for module in ("ipykernel", "matplotlib"):
        pytest.importorskip(module)
    notebook = nbformat.read(path, as_version=4)
    source = "\n".join(cell.source for cell in notebook.cells)
    # The kernel inherits this process's environment.
    for env_var, fixture in CHECKPOINT_FIXTURES.items():
        if env_var in source:
            monkeypatch.setenv(env_var, str(request.getfixturevalue(fixture)))
    monkeypatch.setenv("NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("DDIM_FID_CACHE", str(tmp_path / "fid_cache"))  # reference statistics: not in ~/.cache
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures become outputs
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # no notebooks/__pycache__ from `import _common`
    for name, value in SINGLE_THREAD.items():
        monkeypatch.setenv(name, value)
    before = _files_under(NOTEBOOK_DIR) | _files_under(REPO / "runs")

    # No kernel directories: "python3" is then ipykernel's native kernel of this interpreter (sys.executable), never
    # a python3 kernelspec that some other Jupyter installation registered.
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = nbclient.NotebookClient(
        notebook, km=kernel, timeout=300, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell (or an assert) fails

    figures = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
               if "image/png" in out.get("data", {})]  # fmt: skip
    assert figures, f"{path.name} drew no figure"
    assert _files_under(NOTEBOOK_DIR) | _files_under(REPO / "runs") == before, f"{path.name} wrote into the repository"
