"""The page at / in a real browser (Debian's headless chromium, driven by Selenium; one browser for the module)
against a real server: it loads the models, shows the translation as its tokens stream in, the score, the n-best
list and one heatmap cell per source x target token, and a readable error for an unknown model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from service.gen.attnserve.v1 import translator_pb2 as pb
from service.gen.attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.service.server_harness import ServerThread
from tools.browser import browser_binaries, headless_chromium, translate_on_page

pytestmark = pytest.mark.slow  # starts a server and a browser

# Records every text the translation shows, in order: one record per change (the page sets it once per streamed
# token, then the final result), however the browser batches its observer callbacks.
WATCH_TRANSLATION = """
window.shownTexts = [];
new MutationObserver((records) => {
    for (const record of records) for (const node of record.addedNodes) window.shownTexts.push(node.textContent);
}).observe(document.getElementById("translation"), {childList: true});
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if browser_binaries() is None:
        message = "chromium and chromedriver are not installed: run `make browser-tools` (Debian's packages)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def by_id(driver: Any, name: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def cells(driver: Any) -> int:
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, "#heatmap td.cell"))


def shown_score(hypothesis: pb.Hypothesis) -> str:
    """The score as the page shows it: the page reads it from the HTTP API's JSON, where a float32 is written as the
    shortest decimal that reads back as the same float32 (-4.41015 for the float32 nearest it), and rounds that to
    4 places. Rounding the float32's own value (-4.41015005...) can land on the other side of a last digit."""
    return f"{json_format.MessageToDict(hypothesis)['score']:.4f}"


def test_greedy_translation_streams_and_draws_the_attention(
    browser: Any, server: ServerThread, stub: pb_grpc.TranslatorStub, tmp_path: Path
) -> None:
    text = "3 mars 1999"
    request = pb.TranslateRequest(model="dates", texts=[text], options=pb.DecodeOptions(return_attention=True))
    expected = list(stub.TranslateStream(request, timeout=60))
    *tokens, final = expected
    best = final.hypotheses[0]

    browser.get(server.http_url + "/")  # the page first, so that the watch is installed before translating
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(by_id(d, "model")).options) == 2)
    assert [option.text for option in Select(by_id(browser, "model")).options] == ["dates", "numbers"]
    Select(by_id(browser, "model")).select_by_value("dates")
    Select(by_id(browser, "beam")).select_by_value("1")
    by_id(browser, "text").clear()
    by_id(browser, "text").send_keys(text)
    browser.execute_script(WATCH_TRANSLATION)
    by_id(browser, "translate").click()
    wait.until(lambda d: by_id(d, "result").get_attribute("data-final") == "true")

    # Tokens appeared one by one: the text grew through every prefix the stream sent, then the final text.
    shown = browser.execute_script("return window.shownTexts")
    assert shown == [message.text for message in tokens] + [best.text]
    assert by_id(browser, "translation").text == best.text
    assert by_id(browser, "score").text == shown_score(best)
    assert by_id(browser, "served").text == "dates v1"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#nbest li")) == 1
    assert cells(browser) == len(best.source_tokens) * len(best.target_tokens)
    headers = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#heatmap thead th span")]
    rows = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody th")]
    # Whitespace pieces render empty; the others are the tokens themselves.
    assert [header.strip() for header in headers] == [token.strip() for token in best.source_tokens]
    assert rows == list(best.target_tokens)
    assert not by_id(browser, "error").is_displayed()
    browser.save_screenshot(str(tmp_path / "page.png"))


def test_beam_shows_the_n_best_list(browser: Any, server: ServerThread, stub: pb_grpc.TranslatorStub) -> None:
    from selenium.webdriver.common.by import By

    text = "quarante-deux"
    options = pb.DecodeOptions(beam_size=4, num_hypotheses=4, return_attention=True)
    expected = stub.Translate(pb.TranslateRequest(model="numbers", texts=[text], options=options), timeout=60)
    hypotheses = expected.translations[0].hypotheses
    translate_on_page(browser, server.http_url, "numbers", 4, text)
    items = browser.find_elements(By.CSS_SELECTOR, "#nbest li")
    assert [item.text for item in items] == [f"{h.text}{shown_score(h)}" for h in hypotheses]  # text, then score
    assert by_id(browser, "translation").text == hypotheses[0].text
    assert cells(browser) == len(hypotheses[0].source_tokens) * len(hypotheses[0].target_tokens)


def test_an_unknown_model_shows_a_readable_error(browser: Any, server: ServerThread) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.http_url + "/")
    WebDriverWait(browser, 60).until(lambda d: len(Select(by_id(d, "model")).options) == 2)
    # A model that the server does not have (as after it was removed from the repository since the page loaded).
    browser.execute_script("document.getElementById('model').add(new Option('klingon', 'klingon'), null)")
    Select(by_id(browser, "model")).select_by_value("klingon")
    by_id(browser, "translate").click()
    WebDriverWait(browser, 60).until(lambda d: by_id(d, "error").is_displayed())
    assert by_id(browser, "error").text == (
        "HTTP 404: model 'klingon' not found; available models: dates, numbers (NOT_FOUND)"
    )
    assert not by_id(browser, "result").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, "#heatmap td.cell")
