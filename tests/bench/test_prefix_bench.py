"""The bench's prefix-cache section on tiny settings: real servers with the cache on and off,
the hit count the design implies, identical outputs, and the report. No timing assertions."""

import pytest
from rich.console import Console

from gru_serve.bench import prefix, report
from gru_serve.shipped import default_model_path


@pytest.fixture(scope="module")
def section() -> dict:
    return prefix.run(default_model_path(), prefix.mode_config("tiny"))


def test_hits_and_identical_outputs(section):
    assert "error" not in section, section.get("error")
    on, off = section["rows"]
    assert section["expected_hits"] == 7 and (on["hit"], on["miss"]) == (7, 1)
    assert (off["hit"], off["miss"]) == (0, 0)
    assert section["identical"] is True
    assert section["ttft_p50_ratio"] == pytest.approx(off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"])


def test_report(section):
    results = {"prefix_cache": section}
    text = report.markdown({**_header(), **results}, {})
    assert "## Prefix cache" in text and "identical, bit for bit" in text
    assert "7 hits and 1 miss(es) (as the design implies: 7" in text
    console = Console(record=True, width=200)
    report.print_tables(results, console)
    assert "lower with the prefix cache" in console.export_text()


def test_skips_without_the_text(monkeypatch, tmp_path):
    monkeypatch.setattr(prefix, "TEXT", tmp_path / "nope.txt")
    out = prefix.run(default_model_path(), prefix.mode_config("tiny"))
    assert out["skipped"].endswith("not found (the corpus of a source checkout)")


def _header() -> dict:
    """The least of a results.json that report.markdown needs."""
    return {
        "machine": {
            "cpu": "cpu", "usable_cpus": 1, "cpu_count": 1, "memory_gib": 1, "platform": "p",
            "python": "3", "load_average_at_start": [0, 0, 0],
        },
        "versions": {}, "settings": {"model": "m", "server": "s", "inprocess": {"repeats": 1}},
        "created": "now", "mode": "tiny", "provider": "CPU", "providers": ["CPU"],
        "model": {"hidden": 1, "layers": 1, "vocab": 1, "fast_path": "on"},
    }  # fmt: skip
