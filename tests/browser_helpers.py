"""A real headless browser for the `lmrc show` page: Debian's chromium through its matching chromedriver (both
installed by scripts/setup.sh; nothing is downloaded at run time). Missing under CI, the tests fail, not skip."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def _find(names) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def browser(width: int = 1400, height: int = 1000) -> Iterator:
    """A headless Chromium WebDriver that keeps the page's console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _find(CHROMIUM), _find(("chromedriver",))
    if binary is None or driver_path is None:
        raise AssertionError(
            "no chromium/chromedriver on PATH: `make setup` installs them (apt-get install chromium "
            "chromium-driver, as root)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver, path: Path, fragment: str = "") -> None:
    driver.get(Path(path).resolve().as_uri() + fragment)
    for _ in range(200):
        if driver.execute_script("return document.body && document.body.dataset.ready") == "1":
            return
        driver.implicitly_wait(0.05)
    raise AssertionError(f"{path}: the page never finished loading")


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
