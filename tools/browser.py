"""The page at / in a real browser: Debian's chromium and chromium-driver (`make browser-tools`), headless, driven by
Selenium. Nothing is downloaded: the browser and its driver are the system's.

    python -m tools.browser --url http://127.0.0.1:8000 --model numbers --beam 1 \\
        --text siebenhundertdreiundvierzig --out docs/img/page.png      # the README's screenshot

The tests of the page (tests/service/test_page.py) start the browser the same way.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def browser_binaries() -> tuple[str, str] | None:
    """The paths of chromium and chromedriver, or None when either is missing."""
    browser, driver = shutil.which(CHROMIUM), shutil.which(CHROMEDRIVER)
    return (browser, driver) if browser and driver else None


def headless_chromium(user_data_dir: Path, width: int = 1100, height: int = 1300) -> Any:
    """A Selenium driver of a fresh headless chromium (its profile in `user_data_dir`). Raises RuntimeError when
    chromium or chromedriver is not installed."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binaries = browser_binaries()
    if binaries is None:
        raise RuntimeError("chromium and chromedriver are needed: `make browser-tools` installs Debian's packages")
    browser, driver = binaries
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*HEADLESS_FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def translate_on_page(driver: Any, url: str, model: str, beam: int, text: str, timeout_s: float = 60.0) -> None:
    """Open the page, pick `model` and `beam`, type `text`, translate, and wait for the final result (or an
    error) to show."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url + "/")
    wait = WebDriverWait(driver, timeout_s)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) > 0)
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    Select(driver.find_element(By.ID, "beam")).select_by_value(str(beam))
    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "translate").click()
    wait.until(
        lambda d: (
            d.find_element(By.ID, "result").get_attribute("data-final") == "true"
            or d.find_element(By.ID, "error").is_displayed()
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshot the page of a running attnserve after a translation.")
    parser.add_argument("--url", required=True, help="the server's HTTP base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default="numbers")
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--text", default="siebenhundertdreiundvierzig")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="attnserve-chromium-") as profile:
        driver = headless_chromium(Path(profile))
        try:
            translate_on_page(driver, arguments.url.rstrip("/"), arguments.model, arguments.beam, arguments.text)
            for _ in range(3):  # the viewport is smaller than the window: grow it until the whole page fits
                height = int(driver.execute_script("return document.documentElement.scrollHeight"))
                inner = int(driver.execute_script("return window.innerHeight"))
                if inner >= height:
                    break
                driver.set_window_size(1100, driver.get_window_size()["height"] + height - inner)
            driver.save_screenshot(str(arguments.out))
        finally:
            driver.quit()
    print(f"wrote {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
