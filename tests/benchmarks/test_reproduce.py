"""benchmarks/reproduce.py --quick end to end on the real SmolLM2 (tiny sizes): every section is present, ran, and
carries measured numbers; the header names the command, date, machine and runtime."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SECTION_TITLES = ["1. Attention sinks", "2. StreamingLLM", "3. Retrieval heads", "4. ACT", "5. PASTA", "6. Cost"]
NUMBER = re.compile(r"\|\s*-?\d+(\.\d+)?%?\s*\|")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    from attnkit.models import smollm2_path

    try:
        smollm2_path()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"SmolLM2 weights not installed: {err}")
    out = tmp_path_factory.mktemp("reproduce") / "REPRODUCTIONS.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--quick", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text()


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 4)
    return text[start:end if end >= 0 else None]


def test_header_names_run(quick_report):
    for field in ("- Command: `python benchmarks/reproduce.py --quick", "- Date: ", "- Machine: ",
                  "- Total runtime: ", "--quick run"):
        assert field in quick_report
    assert "FAILED" not in quick_report


def test_summary_has_a_verdict_per_section(quick_report):
    summary = _section(quick_report, "Summary")
    for title in SECTION_TITLES:
        row = next(line for line in summary.splitlines() if line.startswith(f"| {title}"))
        assert row.rstrip(" |").split("|")[-1].strip() in {"yes", "partly", "no"}, row


@pytest.mark.parametrize("title", SECTION_TITLES)
def test_section_has_claim_numbers_and_verdict(quick_report, title):
    body = _section(quick_report, title)
    assert "**Paper's claim.**" in body and "**Reproduced: " in body
    assert len(NUMBER.findall(body)) >= 3, body[:2000]  # measured numbers in its table(s)
    assert not re.search(r"\|\s*(nan|inf)\s*\|", body.lower())  # no undefined measurement in a table cell
