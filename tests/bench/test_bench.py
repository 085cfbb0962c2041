"""`gru-serve bench` on tiny settings: valid JSON, a Markdown report, plots; and the report's
arithmetic (goals, inter-token latency attribution) on known inputs. No timing assertions."""

import json

import pytest

from gru_serve.bench import report, served
from gru_serve.cli import main

SECTIONS = ("batch1", "batched", "sampling", "scheduler", "tuning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    md = out / "docs" / "benchmarks.md"
    argv = [
        "bench",
        "--tiny",
        "--no-torch",
        "--no-served",
        "--no-variants",
        "--no-scaleout",
        "--no-prefix",
        "-o",
        str(out / "b"),
        "--markdown",
        str(md),
    ]
    assert main(argv) == 0
    return out / "b", md


def test_tiny_bench_writes_valid_json(tiny):
    out, _ = tiny
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "gru-serve-bench/1" and results["mode"] == "tiny"
    assert (
        results["provider"]
        and results["versions"][
            "onnxruntime-gpu" if "onnxruntime-gpu" in results["versions"] else "onnxruntime"
        ]
    )
    assert {"cpu", "usable_cpus", "platform", "python"} <= set(results["machine"])
    for section in SECTIONS:
        rows = results["inprocess"][section]
        assert rows and all(r["tokens_per_s"] > 0 and r["us_per_token"] > 0 for r in rows), section
    names = {r["name"] for r in results["inprocess"]["batch1"]}
    assert {
        "ort_exported_step",
        "ort_exported_iobinding",
        "ort_decode_step",
        "ort_decode_iobinding",
        "fused_k4",
    } <= names
    assert {g["goal"] for g in results["goals"]} and all(g["met"] is None for g in results["goals"][:2])


def test_tiny_bench_writes_markdown_and_plots(tiny):
    out, md = tiny
    text = md.read_text()
    assert text.startswith("# Benchmarks") and "## Goals" in text and "### One stream, greedy" in text
    assert "(../b/inprocess.png)" in text and (out / "inprocess.png").stat().st_size > 1000
    assert "(../b/results.json)" in text


def _level(c, tokens_per_s, ttft, itl_p50, itl_p99, tpot, e2e):
    p = lambda x, y=None: {"p50": x, "p90": x, "p99": y or x, "mean": x, "max": y or x}  # noqa: E731
    return {
        "concurrency": c, "tokens_per_s": tokens_per_s, "requests_per_s": 1.0, "ttft_ms": p(ttft),
        "itl_ms": p(itl_p50, itl_p99), "message_gap_ms": p(1.0), "tpot_ms": p(tpot), "e2e_ms": p(e2e),
        "per_stream_tokens_per_s": p(1.0), "tokens_per_message": 4.0, "errors": 0,
    }  # fmt: skip


def test_goals_are_ratios_of_the_run():
    results = {
        "settings": {"inprocess": {"server_k": 32}},
        "torch": {
            "d2l": {"tokens_per_s": 10_000},
            "batched": [{"batch": 64, "tokens_per_s": 100_000, "threads": 2}],
        },
        "inprocess": {
            "batch1": [
                {"name": "ort_decode_iobinding", "batch": 1, "tokens_per_s": 40_000},
                {"name": "ort_exported_step", "batch": 1, "tokens_per_s": 30_000},
                {"name": "fused_k32", "batch": 1, "tokens_per_s": 70_000},
            ],
            "batched": [{"name": "ort_decode_iobinding", "batch": 64, "tokens_per_s": 300_000}],
        },
        "served": {
            "ours": [_level(1, 25_000, 1, 0.0, 1, 0.05, 10), _level(64, 90_000, 5, 0.0, 2.0, 0.5, 100)],
            "baseline": [_level(64, 3_000, 500, 3, 7, 3, 3000)],
        },
    }
    goals = report.goals(results)
    values = [x["value"] for x in goals]
    assert values[0] == pytest.approx(4.0) and values[1] == pytest.approx(7.0)
    assert values[2] == pytest.approx(3.0) and values[3] is None  # no PyTorch figure at 256
    assert values[4] == pytest.approx(25_000 / 70_000)  # of the fused batch-1 figure
    assert values[5] == pytest.approx(90_000 / 300_000) and values[6] is None  # no 256 level
    assert values[7] == pytest.approx(90_000 / 25_000) and "6x one stream" in goals[7]["note"]
    # TPOT p99 0.5 ms over a batch-64 step of 64 / 300,000 s
    assert values[8] == pytest.approx(0.5 / (64 / 300_000 * 1e3)) and goals[8]["met"] is False
    assert goals[9]["value"] == pytest.approx(2.0 / 0.05) and "time per output token" in goals[9]["note"]
    assert values[10] is None and goals[10]["target"] is None  # no engine-thread server
    assert values[11] == pytest.approx(30.0) and goals[12]["met"] is True
    results["served"]["ours_engine_thread"] = [_level(64, 60_000, 5, 0.0, 2.0, 0.5, 100)]
    assert report.goals(results)[10]["value"] == pytest.approx(1.5)


def test_interference_gaps_and_goal(tiny):
    from gru_serve.bench import interference

    # a gap overlapping [1.0, 1.5] counts as during; one ending in [0.5, 1.0] as before
    arrivals = [[0.1, 0.6, 0.65, 0.95, 1.2, 1.6], [0.9, 1.01, 1.02]]
    during, before = interference.max_gaps(arrivals, 1.0, 1.5, 0.5)
    assert during == pytest.approx(0.4) and before == pytest.approx(0.5)
    out, md = tiny
    results = json.loads((out / "results.json").read_text())
    it = results["interference"]
    assert [r["key"] for r in it["rows"]] == ["chunked", "whole"] and not it.get("error")
    for r in it["rows"]:
        assert r["streams_ended_early"] == 0 and r["prompt_tokens"] > 0, r
        # a window shorter than the streams' gap between messages may hold no whole gap before
        assert r["max_gap_during_ms"] > 0 and r["before_window_ms"] > 0, r
    g = report.goals(results)[-2]
    assert g["goal"].startswith("interference") and g["higher_is_better"] is False
    assert g["value"] == pytest.approx(it["rows"][0]["max_gap_during_ms"] / it["round_budget_ms"])
    assert "today's (--prefill-chunk 16384" in g["note"]
    assert "## Interference" in md.read_text()


def test_tokens_of_one_message_share_its_arrival_time():
    arrivals = [(0.010, 1), (0.012, 3), (0.020, 2)]
    rec = served.Record(0.0, arrivals, 0.021, server_ttft=0.004, server_total=0.015)
    out = served.summarize([rec], wall=1.0, concurrency=1, reps=1, tokens=6)
    assert out["tokens"] == 6 and out["messages"] == 3 and out["tokens_per_message"] == 2
    assert out["ttft_ms"]["p50"] == pytest.approx(10.0)
    # 5 gaps: 2 ms and 0, 0 for the second message; 8 ms and 0 for the third
    assert out["itl_ms"]["max"] == pytest.approx(8.0) and out["itl_ms"]["mean"] == pytest.approx(2.0)
    assert out["message_gap_ms"]["mean"] == pytest.approx(5.0)
    assert out["tpot_ms"]["p50"] == pytest.approx(2.0)
    assert out["e2e_ms"]["p50"] == pytest.approx(21.0) and out["errors"] == 0
    assert out["server_ttft_ms"]["p50"] == pytest.approx(4.0)
    assert out["server_e2e_ms"]["p50"] == pytest.approx(15.0)


def test_errors_are_counted_by_code():
    ok = served.Record(0.0, [(0.001, 1)], 0.002)
    out = served.summarize([ok, served.Record(0.0, error="UNAVAILABLE")], 1.0, 2, 1, 1)
    assert out["errors"] == 1 and out["error_codes"] == {"UNAVAILABLE": 1} and out["requests"] == 1


def _scaleout(single_p50, local_p50):
    lat = lambda p50: {"p50": p50, "p90": p50, "p99": 2 * p50, "mean": p50, "max": 2 * p50}  # noqa: E731
    rows = [
        {"key": "single", "what": "single", "turns": 8, "latency_ms": lat(single_p50)},
        {"key": "affinity_local", "what": "on", "turns": 8, "latency_ms": lat(local_p50),
         "redis_out_bytes_per_turn": 40.0, "store_read_bytes_per_turn": 8.0, "same_replica": 1.0},
        {"key": "affinity_only", "what": "off", "turns": 8, "latency_ms": lat(local_p50),
         "redis_out_bytes_per_turn": 3000.0, "store_read_bytes_per_turn": 2700.0, "same_replica": 1.0},
    ]  # fmt: skip
    for r in rows:
        r["p50_ratio"] = r["latency_ms"]["p50"] / single_p50
        r["p99_ratio"] = r["latency_ms"]["p99"] / (2 * single_p50)
    config = {"sessions": 4, "turns": 2, "tokens": 30, "replicas": 3}
    return {"method": "how", "config": config, "goal_ratio": 1.3, "rows": rows}


def test_scaleout_goal_and_markdown(tiny):
    out, _ = tiny
    results = json.loads((out / "results.json").read_text())
    assert report.goals(results)[-1]["met"] is None  # --no-scaleout: not measured
    results["scaleout"] = _scaleout(2.0, 2.4)
    g = report.goals(results)[-1]
    assert g["value"] == pytest.approx(1.2) and g["met"] is True
    text = report.markdown(results, {})
    assert "## Scale-out" in text and "1.20x the single process at p50, within the 1.3x goal" in text
    assert "40 with the local tier, 3,000 without it" in text
    results["scaleout"] = _scaleout(2.0, 3.0)
    assert report.goals(results)[-1]["met"] is False
    results["scaleout"] = {"skipped": "redis-server not found"}
    assert "Skipped: redis-server not found" in report.markdown(results, {})


def test_scaleout_skips_without_the_servers(monkeypatch):
    from gru_serve.bench import scaleout, topology

    def missing(name):
        raise topology.MissingBinary(f"{name} not found")

    monkeypatch.setattr(topology, "installed_binary", missing)
    assert scaleout.run(scaleout.mode_config("tiny")) == {"skipped": "redis-server not found"}


def test_http_and_grpc_streams_side_by_side(tiny):
    """The HTTP/SSE section drives both front ends of one server at each level: every request
    of both transports gets all its tokens (usage-scaled SSE counts equal the tokens asked)."""
    out, md = tiny
    tr = json.loads((out / "results.json").read_text())["transports"]
    assert [r["concurrency"] for r in tr["rows"]] == list(tr["config"]["levels"]) and not tr.get("error")
    for row in tr["rows"]:
        for side in ("grpc", "http"):
            level = row[side]
            assert level["errors"] == 0 and level["requests"] > 0, (side, level["error_codes"])
            assert level["tokens"] == level["requests"] * tr["config"]["tokens"], side
        assert row["ratio"] == row["http"]["tokens_per_s"] / row["grpc"]["tokens_per_s"]
    assert "## HTTP/SSE beside gRPC" in md.read_text()


def test_the_shipped_models_in_tokens_and_characters(tiny):
    out, md = tiny
    rows = json.loads((out / "results.json").read_text())["inprocess"]["shipped"]
    assert {r["name"] for r in rows} == {"timemachine-d2l", "timemachine-full", "timemachine-bpe"}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["chars_per_s"] == r["tokens_per_s"] * r["chars_per_token"]
    bpe = next(r for r in rows if r["name"] == "timemachine-bpe")
    assert bpe["chars_per_token"] > 2  # a byte-level BPE token holds several characters
    assert "### The shipped models" in md.read_text()
