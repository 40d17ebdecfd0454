"""The chat page at / in headless Chromium (Playwright, pointed at Debian's chromium) against a real uvicorn
server on the tiny model: what a user sees when the server goes away, when they stop or retry an answer."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from ragtune.config import load_config
from ragtune.serve.server import create_app
from tests.conftest import free_port
from tests.serve.conftest import FakeRetriever

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HTML_HIT = {"source": "evil/<b>x</b>.md", "title": "<img src=x onerror=\"document.title='pwned'\">",
            "page": None, "heading": "<script>document.title='pwned2'</script>", "score": 0.03,
            "dense_score": 0.9, "chunk_id": "e1", "text": "Remote work <img src=y onerror=\"document.title='pwned3'\">"}


class Server:
    """A real uvicorn server in a thread on a fixed loopback port, so a test can stop it and start it again."""

    def __init__(self, app: Any, port: int):
        self.app, self.port = app, port
        self.server: Any = None
        self.thread: threading.Thread | None = None

    def start(self) -> "Server":
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:  # the test extra installs playwright and scripts/test.sh the Debian chromium: missing is a failure
        from playwright import sync_api
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]' (./scripts/setup.sh does it)")
    if CHROMIUM is None:
        pytest.fail("no chromium: apt-get install chromium (./scripts/test.sh does it where it can); "
                    "the page tests drive it headless")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def page_cfg(tmp: Path, tiny_llama: Path, *extra: str) -> Any:
    f = tmp / "serve.yaml"
    f.write_text(f"model:\n  path: {tiny_llama}\n"
                 "generation:\n  max_new_tokens: 24\n"
                 "serve:\n  max_tokens_limit: 900\n  deployments:\n"
                 "    - {name: base}\n"
                 "    - {name: base+rag, index: docs}\n")
    return load_config(f, list(extra))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, loaded_gen: Any) -> Iterator[Server]:
    cfg = page_cfg(tmp_path_factory.mktemp("page"), tiny_llama)
    app = create_app(cfg, generator=loaded_gen, retrievers={"docs": FakeRetriever([HTML_HIT])})
    s = Server(app, free_port()).start()
    yield s
    s.stop()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    pg = browser.new_page(viewport={"width": 900, "height": 700})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url)
    until(pg, "document.querySelectorAll('#model option').length > 0")
    yield pg
    pg.close()
    assert not errors, errors


def until(pg: Any, js: str, timeout: float = 30) -> None:
    """Wait until `js` is truthy in the page (Playwright's wait_for_function evaluates strings, which the
    page's Content-Security-Policy forbids)."""
    deadline = time.time() + timeout
    while not pg.evaluate(js):
        assert time.time() < deadline, f"timed out waiting for {js}"
        time.sleep(0.05)


def send(pg: Any, text: str) -> None:
    pg.fill("#q", text)
    pg.press("#q", "Enter")


def idle(pg: Any) -> None:
    """Wait until no answer is in flight (the Send button is back)."""
    pg.wait_for_selector("#send:not([disabled]):not([hidden])", timeout=30000)


def test_server_gone_keeps_the_question_and_retry_answers_once_it_is_back(page: Any, server: Server) -> None:
    """The page used to say 'error: Failed to fetch', drop the question from the box and offer nothing; now it says
    the server cannot be reached, puts the question back, and Retry asks again once the server is back."""
    send(page, "first question")
    idle(page)
    server.stop()
    try:
        send(page, "what about Tuesdays?")
        idle(page)
        err = page.inner_text(".turn.error")
        assert "cannot reach the server" in err, err
        assert page.input_value("#q") == "what about Tuesdays?"
    finally:
        server.start()
    page.fill("#q", "")
    page.click(".turn.error button.retry")
    idle(page)
    assert page.locator(".turn.error").count() == 0
    users = page.locator(".turn.user").all_inner_texts()
    assert users == ["first question", "what about Tuesdays?"]
    assert page.evaluate("history.map(m => m.role)") == ["user", "assistant", "user", "assistant"]


def slow_network(pg: Any, bytes_per_s: int = 1500) -> None:
    """Chromium's own throttling (DevTools): the tiny model's answer arrives over seconds, as on a slow link."""
    cdp = pg.context.new_cdp_session(pg)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": bytes_per_s,
                                                  "uploadThroughput": -1})


def answering(pg: Any) -> None:
    """Wait until part of the answer is on the page."""
    until(pg, "(document.querySelector('.turn.assistant span') || {}).textContent")


def test_stop_keeps_the_partial_answer_and_enter_waits_while_answering(page: Any) -> None:
    """There was no way to stop an answer, and Enter during one sent a second request into the same
    conversation; now Stop (or Esc) ends it keeping what came, and Enter does nothing until it ends."""
    slow_network(page)
    send(page, "tell me everything")
    answering(page)
    page.fill("#q", "next question")
    page.press("#q", "Enter")
    assert page.locator(".turn").count() == 2 and page.input_value("#q") == "next question"
    page.click("#stop")
    idle(page)
    partial = page.inner_text(".turn.assistant span")
    assert partial and "stopped" in page.inner_text(".turn.assistant .meta")
    assert page.evaluate("history") == [{"role": "user", "content": "tell me everything"},
                                        {"role": "assistant", "content": partial}]


def test_new_chat_during_an_answer_ends_it_and_keeps_it_out_of_the_new_chat(page: Any) -> None:
    slow_network(page)
    send(page, "tell me everything")
    answering(page)
    page.click("#reset")
    idle(page)
    page.wait_for_timeout(500)
    assert page.inner_text("#log") == "" and page.evaluate("history") == []


def test_enter_that_ends_a_korean_composition_does_not_send(page: Any) -> None:
    """With a Korean (or any) input method, the Enter that commits the syllable being composed sent the
    half-typed question; now it only commits, and the next Enter sends the whole text."""
    page.fill("#q", "재택근무는 며칠")
    page.focus("#q")
    page.keyboard.press("End")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.imeSetComposition", {"text": "까", "selectionStart": 1, "selectionEnd": 1})
    page.keyboard.press("Enter")
    assert page.locator(".turn").count() == 0
    cdp.send("Input.insertText", {"text": "까"})  # the input method commits the syllable
    page.keyboard.press("Enter")
    idle(page)
    assert [t.strip() for t in page.locator(".turn.user").all_inner_texts()] == ["재택근무는 며칠까"]


@pytest.fixture
def keyed_page(browser: Any, tmp_path: Path, tiny_llama: Path, loaded_gen: Any) -> Iterator[Any]:
    s = Server(create_app(page_cfg(tmp_path, tiny_llama, "serve.api_key=sekret"), generator=loaded_gen,
                            retrievers={"docs": FakeRetriever()}), free_port())
    s.start()
    pg = browser.new_page()
    try:
        pg.goto(s.url)
        yield pg
    finally:
        pg.close()
        s.stop()


def test_a_server_with_an_api_key_asks_for_it_in_the_page(keyed_page: Any) -> None:
    """It said 'models: missing API key: send 'Authorization: Bearer <key>' ...', header talk a page user cannot
    act on; now it points at the API key box (outlined), says when the key is wrong, and works once it is typed."""
    pg = keyed_page
    until(pg, "document.getElementById('status').textContent")
    assert "type it in the API key box" in pg.inner_text("#status")
    assert "wanted" in pg.get_attribute("#key", "class")
    pg.fill("#key", "wrong")
    pg.press("#key", "Enter")
    until(pg, "document.getElementById('status').textContent.includes('did not accept')")
    send(pg, "hello")
    idle(pg)
    assert "did not accept this API key" in pg.inner_text(".turn.error")
    pg.fill("#key", "sekret")
    pg.press("#key", "Tab")
    until(pg, "document.querySelectorAll('#model option').length > 0")
    assert pg.inner_text("#status") == "" and "wanted" not in (pg.get_attribute("#key", "class") or "")
    pg.click(".turn.error button.retry")
    idle(pg)
    assert pg.locator(".turn.error").count() == 0 and pg.locator(".turn.assistant .meta").count() == 1


def test_an_answer_cut_by_the_token_limit_says_so(page: Any) -> None:
    """An answer that ran into max_new_tokens (24 here) ended mid-sentence with nothing to tell it from a whole one."""
    send(page, "hello")
    idle(page)
    meta = page.inner_text(".turn.assistant .meta")
    assert "24 answer tokens" in meta and "cut off" in meta and "max_new_tokens" in meta, meta


def test_a_conversation_past_the_context_says_start_a_new_chat_and_one_does(page: Any) -> None:
    """A conversation that outgrew the context got the server's 'shorten the conversation', which a page user
    cannot do; now it says 'new chat' starts a new one, the long text goes back into the box, and new chat works."""
    send(page, "hello")
    idle(page)
    long = "word " * 3000
    send(page, long)
    idle(page)
    err = page.inner_text(".turn.error")
    assert "context" in err and "'new chat' starts a new conversation" in err, err
    assert page.input_value("#q") == long.strip()
    page.click("#reset")
    send(page, "hello again")
    idle(page)
    assert page.evaluate("history.map(m => m.role)") == ["user", "assistant"]


def test_a_long_unbroken_line_does_not_widen_the_page_on_a_phone(browser: Any, server: Server) -> None:
    """A long URL in a question, answer or source made the page ~2000 px wide on a 375 px phone: everything
    shrank to fit or needed sideways scrolling; now such a line breaks inside its turn."""
    pg = browser.new_page(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        pg.goto(server.url)
        until(pg, "document.querySelectorAll('#model option').length > 0")
        pg.select_option("#model", "base+rag")
        send(pg, "see https://example.com/" + "averyverylongpathsegment" * 10)
        idle(pg)
        assert pg.evaluate("document.documentElement.scrollWidth") <= 375
    finally:
        pg.close()


def test_markup_from_documents_never_runs_and_the_page_forbids_inline_handlers(page: Any) -> None:
    """Sources and questions carrying <img onerror>/<script> are shown as text; and the page is served with a
    Content-Security-Policy allowing only its own script, so markup that ever reached the DOM would not run
    (before: no policy, an injected onerror handler ran)."""
    page.select_option("#model", "base+rag")
    send(page, "<img src=z onerror=\"document.title='pwned0'\"> remote work?")
    idle(page)
    assert page.locator(".turn img, .turn script, .turn b").count() == 0
    assert "<script>document.title='pwned2'</script>" in page.inner_text(".sources")
    page.evaluate("document.body.insertAdjacentHTML('beforeend', '<img src=x onerror=\"document.title=1\">')")
    page.wait_for_timeout(300)
    assert page.title() == "ragtune chat"
    assert page.evaluate("history.length") == 2  # the page's own script still runs under the policy
