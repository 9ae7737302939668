"""Execute a notebook from notebooks/ with nbclient and return what it computed.

The kernel is the interpreter running the tests (a kernelspec written to a temporary JUPYTER_PATH), so no
``ipykernel install`` step is needed on a fresh machine; it starts in notebooks/ (as a user's Jupyter would) with
the checkout first on ``sys.path``, and it uses as many torch threads as the test process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
KERNEL_NAME = "attnkit-tests"
CELL_TIMEOUT_S = 600  # a hang guard, not a speed target (the notebooks take well under 2 minutes on CPU)


def write_kernelspec(root: Path) -> None:
    """A kernelspec for ``sys.executable`` under ``root/kernels``; point JUPYTER_PATH at ``root`` to use it."""
    import torch

    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TQDM_DISABLE": "1",
    }
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"attnkit tests ({sys.executable})", "language": "python", "env": env}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))


class Executed:
    """An executed notebook: its cells, the runtime, the ``SUMMARY {...}`` line and the PNG outputs."""

    def __init__(self, nb, seconds: float):
        self.nb = nb
        self.seconds = seconds
        self.stdout = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                              if o.output_type == "stream" and o.get("name") == "stdout")
        lines = [line for line in self.stdout.splitlines() if line.startswith("SUMMARY ")]
        self.summary = json.loads(lines[-1][len("SUMMARY "):]) if lines else None
        self.markdown = "".join(o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code"
                                for o in c.outputs if "text/markdown" in o.get("data", {}))
        self.pngs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if "image/png" in o.get("data", {})]
        self.figure_reprs = [o["data"].get("text/plain", "") for c in nb.cells if c.cell_type == "code"
                             for o in c.outputs if "data" in o and "image/png" not in o["data"]
                             and "Figure size" in o["data"].get("text/plain", "")]


def execute(name: str, tmp_path: Path, monkeypatch) -> Executed:
    import nbformat
    from nbclient import NotebookClient

    write_kernelspec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) when a cell fails
    seconds = time.perf_counter() - start
    print(f"{name}: executed in {seconds:.1f} s")
    return Executed(nb, seconds)
