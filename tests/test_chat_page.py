"""The browser chat page (GET /) in headless Chromium, against a real server on the tiny random model."""
import re
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from test_serve import KEY, Server, engine, model, tok  # noqa: F401  (model, tok: the server tests' fixtures)

USAGE = r"prompt (\d+) \(cache hit (\d+)\) · completion (\d+)"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chrome_paths() -> tuple[str, str]:
    """(browser, chromedriver) found on PATH; fails (never skips), naming what is missing."""
    browser = next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, path in ((f"a Chromium (none of: {', '.join(BROWSERS)})", browser),
                                       ("chromedriver", driver)) if path is None]
    if missing:
        pytest.fail(f"the chat page's browser test needs {' and '.join(missing)} on PATH: run the README's test "
                    "command, bash scripts/test.sh, which installs Debian's chromium and chromium-driver, or see "
                    "its message for other systems", pytrace=False)
    return browser, driver


def test_a_missing_browser_fails_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(pytest.fail.Exception, match="a Chromium .* and chromedriver on PATH"):
        chrome_paths()
    (tmp_path / "chromedriver").write_text("")
    (tmp_path / "chromedriver").chmod(0o755)
    with pytest.raises(pytest.fail.Exception, match=r"needs a Chromium \(none of: chromium, .*\) on PATH"):
        chrome_paths()


@pytest.fixture
def browser(request):
    """Headless Chromium's webdriver on a fresh server's chat page."""
    binary, driver = chrome_paths()
    server = Server(engine(request.getfixturevalue("model"), request.getfixturevalue("tok")))
    try:
        opts = webdriver.ChromeOptions()
        opts.binary_location = binary
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
            opts.add_argument(arg)
        chrome = webdriver.Chrome(options=opts, service=Service(driver))
        try:
            chrome.get(server.url + "/")
            yield chrome
        finally:
            chrome.quit()
    finally:
        server.stop()


def test_chat_page_streams_a_multi_turn_conversation(browser, tmp_path):
    d, wait = browser, WebDriverWait(browser, 30)
    el = d.find_element
    wait.until(lambda d: "401" in el(By.ID, "model").text)  # /v1/models needs the key: the page says so
    el(By.ID, "api-key").send_keys(KEY)
    wait.until(lambda d: d.execute_script("return document.body.dataset.model") == "tiny")
    el(By.ID, "system").send_keys("You are terse.")
    el(By.ID, "temperature").clear()
    el(By.ID, "temperature").send_keys("0")  # greedy: the same prompt as test_serve's CHAT, a known non-empty answer

    def ask(text: str, n: int) -> tuple[str, tuple[int, ...]]:
        """Send `text` as the n-th turn; the finished answer's text and its (prompt, cache hit, completion)."""
        wait.until(lambda d: el(By.ID, "send").is_enabled())
        el(By.ID, "input").send_keys(text)
        if n == 1:
            el(By.ID, "send").click()
        else:
            el(By.ID, "input").send_keys(Keys.ENTER)  # Enter sends too
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.assistant[data-done="1"]')) == n)
        msg = d.find_elements(By.CSS_SELECTOR, "#messages .assistant")[-1]
        assert msg.find_element(By.CLASS_NAME, "error").get_attribute("textContent") == ""
        usage = re.fullmatch(USAGE, msg.find_element(By.CLASS_NAME, "usage").text)
        assert usage, msg.find_element(By.CLASS_NAME, "usage").text
        return msg.find_element(By.CLASS_NAME, "content").get_attribute("textContent"), tuple(map(int, usage.groups()))

    answer, (prompt, hit, completion) = ask("Who is Romeo?", 1)
    assert answer.strip() and prompt > 5 and 0 <= hit <= prompt and completion >= 1
    _, (prompt2, _, completion2) = ask("And Juliet?", 2)
    assert prompt2 > prompt and completion2 >= 1  # the whole conversation was sent again
    assert len(d.find_elements(By.CSS_SELECTOR, "#messages .user")) == 2
    assert len(d.find_elements(By.CSS_SELECTOR, "#messages .assistant")) == 2
    assert el(By.ID, "stop").is_enabled() is False and el(By.ID, "input").get_attribute("value") == ""

    shot = tmp_path / "chat_page.png"
    d.save_screenshot(str(shot))
    print(f"chat page screenshot: {shot}")

    el(By.ID, "new-chat").click()
    assert d.find_elements(By.CSS_SELECTOR, "#messages > *") == []
