"""The reliability suite's figures: tests add to TALLY and record() scenarios; the suite's
conftest writes them for docs/reliability.md (scripts/reliability_report.py)."""

from collections import Counter

# Counters every test adds to: streams held, tokens served, faults injected, bad inputs tried...
TALLY: Counter = Counter()
SCENARIOS: list[dict] = []


def record(scenario: str, **facts) -> None:
    SCENARIOS.append({"scenario": scenario, **facts})
