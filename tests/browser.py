"""Open a local HTML report in headless Chromium (selenium) and look at it as a reader does.

Shared by the report tests: :func:`require_chromium` finds the browser and its driver (the test skips without them,
and fails under ``CI=true``, where ``.ci/run`` installs them), :func:`inspect_page` loads a file at a laptop window
size and returns what a reader sees: the first screen, every image's load state, the page height with every
collapsible closed, whether each ``<details>`` opens, whether clicking a table header reorders its rows, and every
resource the page fetched; it also saves screenshots (the README's come from here)::

    .venv/bin/python tests/browser.py reports/default/index.html docs/report.png
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SKIP_REASON = ("chromium/chromedriver not installed: the browser check of the report was skipped (Debian/Ubuntu: "
               "apt-get install chromium chromium-driver; selenium comes with the [dev] extra)")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


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


def require_chromium() -> tuple[str, str]:
    """The browser for a test: skip without it, except in CI (``CI=true``), where a skipped browser test would hide
    that the report was never looked at."""
    import pytest

    found = find_chromium()
    if found is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("CI=true but " + SKIP_REASON.replace(": the browser check", "; the browser check")
                        .replace("was skipped", "cannot run"))
        pytest.skip(SKIP_REASON)
    return found


# Everything the page fetched or points at outside itself: resource-timing entries (any fetch, failed ones included)
# and every src/href attribute that is not an embedded data: URI or an in-page #anchor.
_NETWORK_JS = """
const entries = performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('data:'));
const refs = [];
document.querySelectorAll('[src], [href]').forEach(el => {
  for (const a of ['src', 'href']) {
    const v = el.getAttribute(a);
    if (v !== null && !v.startsWith('data:') && !v.startsWith('#')) refs.push(el.tagName + ' ' + a + '=' + v.slice(0, 80));
  }
});
return {entries: entries, refs: refs};
"""

_RECT_JS = """
const el = document.querySelector(arguments[0]);
if (!el) return null;
const r = el.getBoundingClientRect();
return {top: r.top + window.scrollY, bottom: r.bottom + window.scrollY, height: r.height, width: r.width};
"""

_ROWS_JS = "return Array.from(arguments[0].tBodies[0].rows).map(r => r.textContent)"


def _close_all(driver) -> None:
    driver.execute_script("document.querySelectorAll('details').forEach(d => d.open = false); window.scrollTo(0, 0)")


def _height(driver) -> int:
    return int(driver.execute_script("return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)"))


def _set_viewport(driver, width: int, height: int) -> None:
    """Size the window so that the visible area (not the window with its frame) is width x height."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    if inner != [width, height]:
        driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])


def _full_page_screenshot(driver, to, width: int, view_height: int) -> None:
    _set_viewport(driver, width, min(_height(driver), 16000))
    Path(to).parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(to))
    _set_viewport(driver, width, view_height)


def inspect_page(path, *, width: int = 1280, height: int = 800, screenshot_to=None, full_page_to=None,
                 user_data_dir=None, timeout: float = 60.0, check_sorting: bool = True) -> dict:
    """Load ``path`` (a local HTML file) in a ``width`` x ``height`` window and return what rendered:

    - ``title``, ``viewport`` ({width, height} of the visible area);
    - ``images``: per <img> its ``src_prefix`` (30 characters), ``complete``, ``natural_width``/``height``;
    - ``tables``: body row count of each table;
    - ``first_screen``: page positions (px) of ``#summary``, its first list item, and the first headline image;
    - ``height_closed``: page height with every <details> closed;
    - ``toc_after_scroll``: the viewport position of the <nav> after scrolling half-way down (None without one);
    - ``details``: per <details> its ``id``, whether it is ``open`` after a click on its <summary>, and the height
      of its content then;
    - ``sorting``: per table with at least two distinct rows, whether a click on one of its headers (up to two
      clicks per header) changed the row order (``changed``) and the header that did it;
    - ``filtering``: per filter box, the rows of its table left after typing the first cell of its first row
      (``shown``; ``expected`` = rows containing that text);
    - ``network``: resource-timing entries that are not data: URIs, and src/href attributes pointing outside the page.

    ``screenshot_to`` saves the first screen, ``full_page_to`` the whole page with every collapsible closed.
    Raises RuntimeError if no browser is installed.
    """
    found = find_chromium()
    if found is None:
        raise RuntimeError(SKIP_REASON)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    own_profile = user_data_dir is None
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-")) if own_profile else Path(user_data_dir)
    for arg in (*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(timeout)
        driver.set_window_size(width, height)
        driver.get(Path(path).resolve().as_uri())
        wait = WebDriverWait(driver, timeout)
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
        # data-URI images decode asynchronously: wait until every one has finished (loaded or failed)
        wait.until(lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete)"))
        _set_viewport(driver, width, height)
        seen = {"title": driver.title,
                "viewport": driver.execute_script("return {width: window.innerWidth, height: window.innerHeight}")}
        seen["images"] = driver.execute_script(
            "return Array.from(document.images).map(i => ({src_prefix: (i.getAttribute('src') || '').slice(0, 30),"
            " complete: i.complete, natural_width: i.naturalWidth, natural_height: i.naturalHeight}))")
        seen["tables"] = driver.execute_script(
            "return Array.from(document.querySelectorAll('table')).map(t => t.tBodies.length ?"
            " Array.from(t.tBodies).reduce((n, b) => n + b.rows.length, 0) : t.rows.length)")
        _close_all(driver)
        seen["first_screen"] = {name: driver.execute_script(_RECT_JS, sel) for name, sel in
                                (("summary", "#summary"), ("first_finding", "#summary li"),
                                 ("headline", "#headline img"))}
        seen["height_closed"] = _height(driver)
        # the table of contents stays in view: its position after scrolling half-way down the page
        seen["toc_after_scroll"] = driver.execute_script(
            "window.scrollTo(0, document.documentElement.scrollHeight / 2);"
            " const n = document.querySelector('nav'); if (!n) return null;"
            " const r = n.getBoundingClientRect(); window.scrollTo(0, 0); return {top: r.top, bottom: r.bottom}")
        if screenshot_to is not None:
            Path(screenshot_to).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot_to))
        if full_page_to is not None:
            _full_page_screenshot(driver, full_page_to, width, height)
            _close_all(driver)
        details = []
        for d in driver.find_elements(By.CSS_SELECTOR, "details"):
            summary = d.find_element(By.CSS_SELECTOR, ":scope > summary")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)
            summary.click()  # a real click, as a reader opens it
            details.append(driver.execute_script(
                "const d = arguments[0]; let h = 0;"
                " for (const c of d.children) if (c.tagName !== 'SUMMARY') h += c.getBoundingClientRect().height;"
                " return {id: d.id, open: d.open, content_height: h}", d))
        seen["details"] = details
        seen["sorting"] = []
        for t in driver.find_elements(By.CSS_SELECTOR, "table") if check_sorting else []:
            before = driver.execute_script(_ROWS_JS, t)
            if len(set(before)) < 2:
                continue
            result = {"id": t.get_attribute("id"), "rows": len(before), "changed": False, "header": None}
            for th in t.find_elements(By.CSS_SELECTOR, "thead th"):
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", th)
                for _ in range(2):  # a column already in ascending order changes on the second click
                    th.click()
                    if driver.execute_script(_ROWS_JS, t) != before:
                        result.update(changed=True, header=th.text)
                        break
                if result["changed"]:
                    break
            seen["sorting"].append(result)
        seen["filtering"] = []
        for box in driver.find_elements(By.CSS_SELECTOR, "input.filter") if check_sorting else []:
            table = driver.find_element(By.ID, box.get_attribute("data-table"))
            rows = driver.execute_script(_ROWS_JS, table)
            word = driver.execute_script("return arguments[0].tBodies[0].rows[0].cells[0].textContent.trim()", table)
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
            box.send_keys(word)  # typed, as a reader filters
            shown = driver.execute_script(
                "return Array.from(arguments[0].tBodies[0].rows).filter(r => !r.hidden).map(r => r.textContent)",
                table)
            words = word.lower().split()  # the filter keeps rows containing every word

            def match(r):
                return all(w in r.lower() for w in words)

            seen["filtering"].append({"id": table.get_attribute("id"), "word": word, "rows": len(rows),
                                      "shown": len(shown), "all_match": all(map(match, shown)),
                                      "expected": sum(map(match, rows))})
        seen["network"] = driver.execute_script(_NETWORK_JS)
    finally:
        driver.quit()
        if own_profile:
            shutil.rmtree(profile, ignore_errors=True)
    return seen


def open_page(path, screenshot_to=None, *, width: int = 1280, height: int = 900, full_page: bool = False,
              user_data_dir=None, timeout: float = 60.0) -> dict:
    """Load ``path`` and return ``dict(images=[...], tables=[...], title=str)`` (a quick look; see
    :func:`inspect_page` for the full one). ``full_page=True`` screenshots the whole page, collapsibles closed."""
    seen = inspect_page(path, width=width, height=height, user_data_dir=user_data_dir, timeout=timeout,
                        check_sorting=False, **({"full_page_to": screenshot_to} if full_page else
                                                {"screenshot_to": screenshot_to}))
    return {k: seen[k] for k in ("images", "tables", "title")}


if __name__ == "__main__":  # the README's screenshots: python tests/browser.py PAGE.html SCREENSHOT.png
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python tests/browser.py PAGE.html SCREENSHOT.png  (full page, collapsibles closed)")
    seen = inspect_page(sys.argv[1], full_page_to=sys.argv[2], check_sorting=False)
    broken = [i["src_prefix"] for i in seen["images"] if not i["natural_width"]]
    head = seen["first_screen"]["headline"]
    print(f"{seen['title']}: {len(seen['images'])} images ({len(broken)} broken), {len(seen['tables'])} tables, "
          f"{len(seen['details'])} collapsibles; page height {seen['height_closed']} px with them closed; headline "
          f"figure at {head and round(head['top'])}-{head and round(head['bottom'])} px; "
          f"outside references {len(seen['network']['entries']) + len(seen['network']['refs'])} -> {sys.argv[2]}")
    sys.exit(1 if broken else 0)
