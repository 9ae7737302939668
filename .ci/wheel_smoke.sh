#!/usr/bin/env bash
# Wheel smoke: build the wheel in isolation (the checkout is left exactly as it was), install it into a clean
# venv, and from a folder outside the checkout run the CLI, attach a span-aware recipe to a tiny model and
# generate a left-padded batch, and execute one notebook. Nothing may depend on the repository layout.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== wheel smoke: building"
before=$(git status --porcelain --ignored | grep -v '^!! \.venv' || true)
# build from a copy of the working tree (tracked and untracked, not ignored), so nothing lands in the checkout
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$work/src" 2>/dev/null || true
$PYTHON -m venv "$work/build-env"
"$work/build-env/bin/python" -m pip install -q --upgrade pip build
(cd "$work/src" && "$work/build-env/bin/python" -m build -q --wheel --outdir "$work/dist" . >/dev/null)
after=$(git status --porcelain --ignored | grep -v '^!! \.venv' || true)
if [ "$before" != "$after" ]; then
  echo "building the wheel changed the checkout:"; diff <(echo "$before") <(echo "$after") || true; exit 1
fi
wheel=$(ls "$work"/dist/attnkit-*.whl)
echo "built $(basename "$wheel")"

echo "== wheel smoke: installing into a clean venv"
$PYTHON -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -c constraints.txt "${wheel}[demo,eval]" nbclient ipykernel
"$py" .ci/versions.py "wheel smoke (locked)"

mkdir "$work/outside"
cp notebooks/02_lvlm_visual_attention.ipynb "$work/outside/"
cd "$work/outside"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error MPLBACKEND=Agg
unset PYTHONPATH

echo "== wheel smoke: attnkit presets"
"$work/venv/bin/attnkit" presets

echo "== wheel smoke: span-aware recipe, left-padded batch, generate"
"$py" - <<'PY'
import site, torch, attnkit
from attnkit.interventions.steering.pasta import Pasta
from attnkit.testing import tiny_causal_lm
assert "site-packages" in attnkit.__file__, f"attnkit imported from {attnkit.__file__}, not the installed wheel"
model = tiny_causal_lm("llama")
ids = torch.tensor([[0, 0, 1, 9, 5, 7], [1, 6, 4, 9, 5, 7]])
mask = (ids != 0).long()
with torch.no_grad(), attnkit.attach(model, [Pasta(alpha=0.01, layers=[0, 1])]) as handle:
    handle.set_span("emphasis", [[(3, 5)], [(3, 5)]])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert handle.tracker.length == ids.shape[1] + 3, handle.tracker.length
print("generated", out[:, ids.shape[1]:].tolist(), "| calls:", handle.report()["calls"])
PY

echo "== wheel smoke: the data root outside a checkout"
"$py" - <<'PY'
import os
from attnkit import data
os.environ.pop("ATTNKIT_DATA", None)
root, why = data.data_root()
assert "per-user" in why, (root, why)
try:
    data.data_path("pope", "missing.json", must_exist=True)
except FileNotFoundError as err:
    assert "ATTNKIT_DATA" in str(err) and str(root) in str(err), err
    print("missing data says:", err)
PY

echo "== wheel smoke: executing notebook 02 (ATTNKIT_DATA=$repo/../shared/data)"
ATTNKIT_DATA="$repo/../shared/data" "$py" - <<'PY'
import nbformat
from nbclient import NotebookClient
nb = nbformat.read("02_lvlm_visual_attention.ipynb", as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3").execute()
errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
assert not errors, errors
print(f"notebook 02 ran: {sum(c.cell_type == 'code' for c in nb.cells)} code cells")
PY
echo "== wheel smoke: passed"
