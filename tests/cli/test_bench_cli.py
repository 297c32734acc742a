"""``vmferry bench vmm --quick`` runs end to end and writes the JSON it promises.

The numbers themselves are not checked (benchmarks are not tests), only that each
measurement and its baseline came out as a positive number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import vmferry

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

MEASUREMENT_KEYS = {
    "section",
    "what",
    "value",
    "unit",
    "baseline",
    "baseline_value",
    "ratio",
    "note",
}


def test_bench_vmm_quick_writes_json_with_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    p = vmferry("bench", "vmm", "--quick", "--json", str(out), "--dir", str(tmp_path), timeout=30)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert {"plan", "host", "elapsed_s", "measurements"} <= doc.keys()
    assert doc["plan"] == "quick"
    rows = doc["measurements"]
    assert {r["section"] for r in rows} == {"a) dirtying rate", "b) save/restore", "c) bitmap scan"}
    for r in rows:
        assert r.keys() >= MEASUREMENT_KEYS, r
        for key in ("value", "baseline_value", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    # nothing left behind in the work directory but the JSON itself
    assert sorted(tmp_path.iterdir()) == [out]
    # the table went to stdout
    assert b"ratio" in p.stdout
