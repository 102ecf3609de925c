"""benchmarks/: the README's table is generated from history.jsonl, short cells only,
and every benchmark script can append its figures (`--record`). No benchmark runs here."""
import argparse
import json

import pytest

from benchmarks import record
from conftest import ROOT


def test_readme_table_is_the_one_generated_from_the_history_and_no_cell_is_long():
    readme = record.README.read_text()
    assert record.with_table(readme, record.load()) == readme, "run `python benchmarks/record.py --table`"
    rows = [line for line in readme.splitlines() if line.startswith("|")]
    assert len(rows) > 2
    for row in rows:
        for cell in row.strip("|").split(" | "):
            assert len(cell.strip()) <= record.MAX_CELL, cell


def test_table_refuses_a_long_cell():
    long = {"benchmark": "x.py", "figure": "f", "value": 1.0, "unit": "s", "date": "2026-12-06",
            "machine": "m", "target": "t" * (record.MAX_CELL + 1)}
    with pytest.raises(ValueError, match="x.py, f"):
        record.table([long])


def test_a_recorded_figure_becomes_the_latest_row(tmp_path, monkeypatch):
    history = tmp_path / "history.jsonl"
    history.write_text(json.dumps({"benchmark": "b.py", "figure": "speed", "value": 1.0, "unit": "steps/s",
                                   "date": "2026-01-01", "machine": "old", "commit": None, "note": ""}) + "\n")
    args = record.add_flag(argparse.ArgumentParser()).parse_args(["--record"])
    monkeypatch.setattr("sys.argv", ["benchmarks/b.py", "--steps", "10", "--record"])
    record.save(args, [record.figure("speed", 2.0, "steps/s", baselines={"bare": 4.0})], history=history)
    record.save(args, [record.figure("hidden", 1.0, "s") | {"table": False}], history=history)
    saved = record.load(history)
    assert saved[1]["command"] == "b.py --steps 10" and saved[1]["ratios"] == {"bare": 0.5}
    rows = record.table(saved).splitlines()[2:]
    assert len(rows) == 1 and "**2** steps/s (0.5 × bare 4)" in rows[0]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                                          if p.name != "record.py"))
def test_every_benchmark_script_takes_record(script):
    """Read, not run (each imports JAX and measures for minutes): its parser gets the flag
    and its figures go to `record.save`."""
    source = (ROOT / "benchmarks" / script).read_text()
    assert "record.add_flag(argparse.ArgumentParser(" in source and "record.save(args, " in source
