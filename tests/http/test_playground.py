"""The playground page in a real browser (Chromium driven by Playwright) against a real server:
what it streams equals gRPC and the independent reference, Continue and Fork do what the
sessions API says. It takes a screenshot; with GRU_SERVE_UPDATE_SCREENSHOT=1 it replaces
docs/playground.png (the README's), so a plain test run leaves the tree as it was."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from gru_serve.client import Client, sampling
from gru_serve.sampling import SamplingParams
from tests.support.serving import D2L, reference_generate, start_http_server

CHROMIUM = os.environ.get("GRU_SERVE_CHROMIUM", "/usr/bin/chromium")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
MODEL = "timemachine-d2l"
PROMPT = "the time traveller"
N = 40
WAIT_MS = 60_000  # a bound on any one wait, not a pace: each wait returns as soon as its condition holds


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: `make install` or `make test` installs it "
            "(apt-get install -y chromium, as root), or set GRU_SERVE_CHROMIUM to another binary"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser: Browser, base_url: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 750}, base_url=base_url)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    failures: list[str] = []
    page.on("pageerror", lambda e: failures.append(str(e)))
    try:
        yield page
    finally:
        context.close()
    assert not failures, f"errors in the page: {failures}"


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    yield from open_page(browser, server.http_target)


def loaded(page: Page) -> None:
    page.goto("/")
    expect(page).to_have_title("gru-serve playground")
    expect(page.locator(f"#model option[value='{MODEL}']")).to_have_count(1)


def settings(page: Page, temperature: str = "0", max_tokens: int = N, seed: str = "") -> None:
    page.select_option("#model", MODEL)
    page.fill("#temperature", temperature)
    page.fill("#top-k", "0")
    page.fill("#top-p", "1")
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#seed", seed)


def press(page: Page, button: str, prompt: str) -> str:
    """Type the prompt, press the button, wait for the generation to end; the output's state."""
    runs = int(page.get_attribute("#output", "data-runs") or 0)
    page.fill("#prompt", prompt)
    page.click(button)
    ended = page.locator(f"#output[data-runs='{runs + 1}']")
    expect(ended).to_have_count(1)
    return ended.get_attribute("data-state") or ""


def number(page: Page, selector: str) -> float:
    return float(page.text_content(selector) or "nan")


def session_json(server, sid: str) -> dict:
    r = httpx.get(f"{server.http_target}/v1/sessions/{sid}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_static_files_need_no_token_and_are_not_cached():
    srv = start_http_server(auth_tokens=("s3cret",))
    try:
        for path, kind in (
            ("/", "text/html"),
            ("/playground.js", "text/javascript"),
            ("/playground.css", "text/css"),
        ):
            r = httpx.get(srv.http_target + path, timeout=30)
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (path, r.headers)
            assert r.headers["cache-control"] == "no-cache" and r.content
        assert httpx.get(srv.http_target + "/v1/models", timeout=30).status_code == 401
    finally:
        srv.stop()


def test_generate_continue_fork_match_grpc_and_the_reference(page, server):
    loaded(page)
    settings(page)

    # Generate: a new session, streamed; equals gRPC and the reference.
    assert press(page, "#generate", PROMPT) == "done"
    with Client(server.target) as c:
        text, fin = c.generate_text(PROMPT, max_new_tokens=N)
        assert text == reference_generate(D2L, PROMPT, N) and len(text) == N
        expect(page.locator("#output")).to_have_text(PROMPT + text)
        expect(page.locator("#output .gen")).to_have_text(text)
        assert page.text_content("#output") == PROMPT + text  # exact: to_have_text folds whitespace
        assert number(page, "#ttft") > 0 and number(page, "#tps") > 0
        sid = page.text_content("#session") or ""
        assert sid and sid != "none"
        assert int(page.text_content("#tokens-seen") or -1) == fin.tokens_seen
        expect(page.locator("#finish")).to_have_text("length")

        # Continue with no new text: the session goes on from its state; N + N equals 2N at once.
        assert press(page, "#continue", "") == "done"
        whole, fin2 = c.generate_text(PROMPT, max_new_tokens=2 * N)
        assert whole == reference_generate(D2L, PROMPT, 2 * N)
        expect(page.locator("#output")).to_have_text(PROMPT + whole)
        assert page.text_content("#output") == PROMPT + whole
        expect(page.locator("#session")).to_have_text(sid)
        assert session_json(server, sid)["tokens_seen"] == fin2.tokens_seen == c.get_session(sid).tokens_seen
        expect(page.locator("#tokens-seen")).to_have_text(str(fin2.tokens_seen))
        shot = page.screenshot()
        assert shot.startswith(b"\x89PNG")
        if os.environ.get("GRU_SERVE_UPDATE_SCREENSHOT") == "1":
            DOCS_SCREENSHOT.write_bytes(shot)

        # Fork: a new id with the same state; Continue then goes on the fork, not the original.
        page.click("#fork")
        expect(page.locator("#session")).not_to_have_text(sid)
        fork = page.text_content("#session") or ""
        assert fork and fork != sid
        assert session_json(server, fork)["tokens_seen"] == fin2.tokens_seen
        expect(page.locator("#tokens-seen")).to_have_text(str(fin2.tokens_seen))
        assert press(page, "#continue", " and") == "done"
        assert session_json(server, sid)["tokens_seen"] == fin2.tokens_seen  # the original is untouched
        same, _ = c.generate_text(" and", session_id=sid, max_new_tokens=N)  # the original, via gRPC
        expect(page.locator("#output .gen").last).to_have_text(same)
        expect(page.locator("#output")).to_have_text(PROMPT + whole + " and" + same)
        assert page.text_content("#output") == PROMPT + whole + " and" + same
        assert session_json(server, fork)["tokens_seen"] == c.get_session(sid).tokens_seen


def test_errors_are_shown_and_leave_the_session_text_as_it_was(page, server):
    loaded(page)
    settings(page, temperature="0.8", max_tokens=10, seed="7")
    assert press(page, "#generate", PROMPT) == "done"
    before = page.text_content("#output")
    expect(page.locator("#seed-used")).to_have_text("7")
    with Client(server.target) as c:
        c.delete_session(page.text_content("#session") or "")
    assert press(page, "#continue", " more") == "error"
    expect(page.locator("#message")).to_have_attribute("data-kind", "error")
    expect(page.locator("#message")).to_contain_text("is unknown")
    expect(page.locator("#output")).to_have_text(before or "")

    # New session clears it all; Generate starts again.
    page.click("#new-session")
    expect(page.locator("#session")).to_have_text("none")
    expect(page.locator("#output")).to_have_text("")
    expect(page.locator("#continue")).to_be_disabled()
    assert press(page, "#generate", PROMPT) == "done"
    seeded = SamplingParams(temperature=0.8, top_k=0, top_p=1.0, seed=7)
    expect(page.locator("#output .gen")).to_have_text(reference_generate(D2L, PROMPT, 10, seeded))


def test_64_bit_seeds_travel_exactly(page, server):
    """Seeds go past 2^53, where a JavaScript number is no longer exact: the page keeps digits."""
    loaded(page)
    settings(page, temperature="1", max_tokens=30, seed="abc")
    assert press(page, "#generate", PROMPT) == "error"
    expect(page.locator("#message")).to_contain_text("Seed")
    expect(page.locator("#session")).to_have_text("none")
    big = 2**53 + 1
    page.fill("#seed", str(big))
    assert press(page, "#generate", PROMPT) == "done"
    expect(page.locator("#seed-used")).to_have_text(str(big))
    seeded = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=big)
    expect(page.locator("#output .gen")).to_have_text(reference_generate(D2L, PROMPT, 30, seeded))
    page.fill("#seed", "")  # a random seed is shown as the server drew it (63 bits)
    assert press(page, "#continue", "") == "done"
    drawn = page.text_content("#seed-used") or ""
    assert drawn.isdigit() and int(drawn) < 2**64
    # Exact: back to turn 1, the drawn seed draws the same text again.
    sid = page.text_content("#session") or ""
    r = httpx.post(f"{server.http_target}/v1/sessions/{sid}/rewind", json={"turn": 1}, timeout=30)
    assert r.status_code == 200, r.text
    with Client(server.target) as c:
        again, _ = c.generate_text(
            "", session_id=sid, max_new_tokens=30, params=sampling(temperature=1.0, seed=int(drawn))
        )
    expect(page.locator("#output .gen").last).to_have_text(again)


def test_a_token_typed_into_the_page_is_sent(browser):
    srv = start_http_server(auth_tokens=("s3cret",))
    try:
        for page in open_page(browser, srv.http_target):
            page.goto("/")
            expect(page.locator("#message")).to_have_attribute("data-kind", "error")
            expect(page.locator("#model option")).to_have_count(0)
            page.fill("#token", "s3cret")
            page.dispatch_event("#token", "change")
            expect(page.locator(f"#model option[value='{MODEL}']")).to_have_count(1)
            settings(page)
            assert press(page, "#generate", PROMPT) == "done"
            expect(page.locator("#output .gen")).to_have_text(reference_generate(D2L, PROMPT, N))
    finally:
        srv.stop()


def test_the_min_p_control_is_sent(page, server):
    loaded(page)
    settings(page, temperature="1.3", seed="8")
    page.fill("#min-p", "1")  # only the likeliest token is left: the greedy text
    assert press(page, "#generate", PROMPT) == "done"
    expect(page.locator("#output .gen").last).to_have_text(reference_generate(D2L, PROMPT, N))
    page.fill("#min-p", "0.2")
    assert press(page, "#generate", PROMPT) == "done"
    seeded = SamplingParams.checked(temperature=1.3, seed=8, min_p=0.2)
    assert reference_generate(D2L, PROMPT, N, seeded) != reference_generate(D2L, PROMPT, N)
    expect(page.locator("#output .gen").last).to_have_text(reference_generate(D2L, PROMPT, N, seeded))
    page.fill("#min-p", "1.5")
    assert press(page, "#generate", PROMPT) == "error"
    expect(page.locator("#message")).to_contain_text("sampling.min_p must be in [0, 1]")
