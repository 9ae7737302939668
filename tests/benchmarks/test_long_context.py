"""benchmarks/long_context.py --quick end to end on SmolLM2 (tiny sizes): both tables are present, every KV method has
a row with measured numbers or a one-sentence refusal, PINE is order-invariant by construction."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("baseline", "StreamingLLM", "kv-retention", "RazorAttention", "DuoAttention", "Recycled", "TidalDecode",
           "LongHeads", "TokenSelect")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from attnkit.models import smollm2_path

    try:
        smollm2_path()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"SmolLM2 weights not installed: {err}")
    out = tmp_path_factory.mktemp("long_context") / "lc.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "long_context.py"), "--quick", "--models",
                           "smollm2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text()


def test_header_and_load_note(quick):
    assert "- Command: `python benchmarks/long_context.py --quick" in quick
    assert "under load" in quick and "- Load average" in quick


def test_every_kv_method_has_a_measured_row(quick):
    rows = [line for line in quick.splitlines() if line.startswith("| SmolLM2")]
    for method in METHODS:
        row = next(r for r in rows if f"| {method} |" in r)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d", cells[2]) and re.fullmatch(r"\d+\.\d\d", cells[3]), row  # NIAH, PPL
        assert cells[4].endswith("%") and cells[5].endswith("%"), row


def test_pine_is_consistent_across_orders(quick):
    row = next(line for line in quick.splitlines() if line.startswith("| SmolLM2") and "| PINE |" in line)
    assert "| 100.0% |" in row
