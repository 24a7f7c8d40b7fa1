"""The chat page of ``minqwen2 serve`` in a real headless Chromium, driven by Selenium.

The browser is the system's (Debian's ``chromium`` and ``chromium-driver``; ``.ci/run``
installs them): Selenium is given both paths and downloads nothing. Without them this test
is skipped with the reason on a developer's machine, and fails in CI (``CI`` set).

The server runs the tiny chat model of test_generate.py, slowed to a few tokens per
second and with its end-of-turn tokens pushed down (:class:`LongReplies`), so that a reply
is still streaming when the test looks at it and presses Stop. The reference for the page's
second reply is ``minqwen2.generate`` on the conversation the page kept, on the same model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_generate import write_tiny_chat_model
from test_serve import TIMEOUT, SlowModel, live_server, need

import minqwen2

webdriver = need("selenium.webdriver", "the test extra has selenium: pip install -e '.[test]'")

from minqwen2.server import build_app  # noqa: E402 (after the import checks)

pytestmark = pytest.mark.timeout(120)


def system_browser() -> tuple[str, str]:
    """Paths of Chromium and its driver; skip (developer) or fail (CI) when they are missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if Path(p).is_file()), None
    )
    if browser and driver:
        return browser, driver
    reason = "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test: {reason}", pytrace=False)
    pytest.skip(reason)


class LongReplies(SlowModel):
    """The slowed model with its end-of-turn logits lowered by 30: replies run to max_tokens."""

    def __init__(self, model, eos_ids) -> None:
        super().__init__(model)
        self.eos_ids = list(eos_ids)

    def __call__(self, *args, **kwargs):
        logits = np.array(super().__call__(*args, **kwargs))  # (1, T, V)
        logits[..., self.eos_ids] -= 30.0
        return logits


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-page")
    write_tiny_chat_model(path)
    model, tokenizer = minqwen2.load(path, backend="numpy")
    slow = LongReplies(model, tokenizer.eos_token_ids)
    app = build_app(slow, tokenizer, max_tokens=300)
    with live_server(app) as url:
        yield SimpleNamespace(url=url, slow=slow, tokenizer=tokenizer, name=path.name,
                              engine=app.state.server.engine)  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = system_browser()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def wait_for(browser, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, TIMEOUT, poll_frequency=0.02).until(lambda d: condition(), message=what)


def test_type_a_message_watch_it_stream_and_stop_it(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def find(css):
        return browser.find_element(By.CSS_SELECTOR, css)

    page_server.slow.delay = 0.03  # ~30 tokens/s: 300 tokens would take ~10 s
    browser.get(page_server.url + "/")
    wait_for(browser, lambda: find("#model").text == page_server.name, "the page to show the model")

    find("#input").send_keys("hello from the browser", Keys.ENTER)

    def reply() -> str:  # the last reply's text exactly as the page holds it (.text would trim it)
        return browser.execute_script(
            "const m = document.querySelectorAll('.msg.assistant'); return m[m.length - 1].textContent"
        )

    wait_for(browser, lambda: len(reply()) > 0, "the first streamed text")
    first = reply()
    wait_for(browser, lambda: len(reply()) > len(first), "more streamed text")
    assert find("#stop").is_enabled() and not find("#send").is_enabled()  # still generating
    assert find(".msg.user").text == "hello from the browser"

    find("#stop").click()
    wait_for(browser, lambda: not find("#stop").is_enabled(), "Stop to end the reply")
    wait_for(browser, lambda: not page_server.engine.busy, "the server to free the model")
    assert "stopped" in find("#stats").text
    stopped = reply()
    conversation = browser.execute_script("return conversation")
    assert conversation[-1] == {"role": "assistant", "content": stopped}  # the page keeps what it showed
    assert 0 < page_server.slow.calls < 300

    # A second, short message: the reply completes, with the model and its speed shown.
    page_server.slow.delay = 0.0
    find("#max-tokens").send_keys("6")
    find("#input").send_keys("and a short one", Keys.ENTER)
    wait_for(browser, lambda: "tokens/s" in find("#stats").text, "the second reply's stats")
    stats = find("#stats").text
    assert stats.startswith(page_server.name) and "6 tokens" in stats and "length" in stats
    conversation = browser.execute_script("return conversation")
    messages = conversation[:-1]
    ref = minqwen2.generate(page_server.slow, page_server.tokenizer, messages, max_tokens=6)
    assert conversation[-1]["content"] == reply() == "".join(r.text for r in ref)
