"""Open a local HTML page in headless Chromium (selenium) and report what rendered.

Shared by the report tests: :func:`find_chromium` says whether a browser and its driver are installed (tests skip
otherwise), :func:`open_page` loads a file, waits for it, and returns every image's load state and every table's
row count, optionally saving a screenshot (the README's comes from here).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

SKIP_REASON = "chromium/chromedriver not installed: the browser check of the report was skipped"


def find_chromium() -> tuple[str, str] | None:
    """(chromium binary, chromedriver) paths, or None when either is missing (or selenium is not installed)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None
    browser = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
                    if p and Path(p).exists()), None)
    driver = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver")) if p and Path(p).exists()),
                  None)
    return (browser, driver) if browser and driver else None


def open_page(path, screenshot_to=None, *, width: int = 1280, height: int = 900, full_page: bool = False,
              user_data_dir=None, timeout: float = 30.0) -> dict:
    """Load ``path`` (a local HTML file) and return ``dict(images=[...], tables=[...], title=str)``.

    ``images`` holds per <img>: ``src_prefix`` (first 30 characters), ``complete``, ``natural_width``,
    ``natural_height``; ``tables`` holds per <table> its number of body rows. ``screenshot_to`` saves a PNG of the
    viewport (of the whole page height with ``full_page=True``). Raises RuntimeError if no browser is installed.
    """
    found = find_chromium()
    if found is None:
        raise RuntimeError(SKIP_REASON)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    own_profile = user_data_dir is None
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-")) if own_profile else Path(user_data_dir)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--hide-scrollbars", f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(timeout)
        driver.get(Path(path).resolve().as_uri())
        wait = WebDriverWait(driver, timeout)
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
        # data-URI images decode asynchronously: wait until every one has finished (loaded or failed)
        wait.until(lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete)"))
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({src_prefix: i.getAttribute('src').slice(0, 30),"
            " complete: i.complete, natural_width: i.naturalWidth, natural_height: i.naturalHeight}))"
        )
        tables = driver.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => t.tBodies.length ?"
            " Array.from(t.tBodies).reduce((n, b) => n + b.rows.length, 0) : t.rows.length)"
        )
        title = driver.title
        if screenshot_to is not None:
            if full_page:
                total = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(width, min(int(total), 16000))
            Path(screenshot_to).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot_to))
    finally:
        driver.quit()
        if own_profile:
            shutil.rmtree(profile, ignore_errors=True)
    return {"images": images, "tables": tables, "title": title}


if __name__ == "__main__":  # the README's screenshot: python tests/browser.py reports/default/index.html docs/report.png
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python tests/browser.py PAGE.html SCREENSHOT.png")
    seen = open_page(sys.argv[1], screenshot_to=sys.argv[2])
    broken = [i["src_prefix"] for i in seen["images"] if not i["natural_width"]]
    print(f"{seen['title']}: {len(seen['images'])} images ({len(broken)} broken), {len(seen['tables'])} tables "
          f"-> {sys.argv[2]}")
    sys.exit(1 if broken else 0)
