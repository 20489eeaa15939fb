"""The Stability tab as a person sees it: a short real run with the default set, opened by
TensorBoard's own server in headless Chromium (driven with Selenium), with a screenshot.

Needs ``chromium``, ``chromedriver`` and ``selenium`` (``.ci/run`` installs them); skipped
with the reason when one of them is absent."""

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from helpers import TinyClassifier, classification_data, loader, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from test_dashboard import _callbacks

from lightning_stability.tensorboard import TIMELINE

pytestmark = pytest.mark.browser

# the first row, left to right
FIRST_ROW = {
    "train_loss": "training loss (train_loss)",
    "stability/sharpness/eos_ratio": "edge-of-stability ratio",
    TIMELINE.LEVEL: "warning level (0 ok, 1 watch, 2 warning, 3 critical)",
    TIMELINE.LR_APPLIED: "learning rate (as applied",
}

# Every element of the page, through the shadow roots of TensorBoard's Polymer elements.
_DEEP = """
function deep(root, out) {
  for (const el of root.querySelectorAll('*')) {
    out.push(el);
    if (el.shadowRoot) deep(el.shadowRoot, out);
  }
  return out;
}
function text(root) {
  return deep(root.shadowRoot || root, []).map(e => Array.from(e.childNodes)
    .filter(n => n.nodeType === Node.TEXT_NODE).map(n => n.textContent).join(' ')).join(' ');
}
function category(el) {
  while (el) {
    if (el.localName === 'tf-category-paginated-view') return el.category.name;
    el = el.parentNode instanceof ShadowRoot ? el.parentNode.host : el.parentNode;
  }
  return null;
}
const all = deep(document, []);
const dashboard = all.find(e => e.localName === 'tf-custom-scalar-dashboard');
const cards = all.filter(e => /^tf-custom-scalar-.*-card$/.test(e.localName));
return {
  smoothing: dashboard ? dashboard._smoothingWeight : null,
  categories: all.filter(e => e.localName === 'tf-category-paginated-view')
    .map(e => e.category.name),
  // in document order, which is the order the page lays the cards out in
  cards: cards.map(c => {
    const inner = deep(c.shadowRoot || c, []);
    const box = c.getBoundingClientRect();
    return {
      kind: c.localName,
      top: Math.round(box.top),
      left: Math.round(box.left),
      title: c.title,
      category: category(c),
      text: text(c).replace(/\\s+/g, ' '),
      smoothed: inner.filter(e => e.localName === 'vz-line-chart2').map(v => v.smoothingEnabled),
      // points per drawn line (an "M x,y" then one "L x,y" per further point)
      lines: inner.filter(e => e.localName === 'path' && e.classList.contains('line'))
        .map(p => ((p.getAttribute('d') || '').match(/[ML]/g) || []).length),
    };
  }),
  requests: performance.getEntriesByType('resource').map(e => e.name)
    .filter(n => n.includes('/data/plugin/custom_scalars/scalars')),
};
"""


def _browser_tools():
    """(chromium, chromedriver) paths; the test is skipped when one is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    chromium = next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
    )
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing = [n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None]
        pytest.skip(
            f"{' and '.join(missing)} not on PATH (apt-get install chromium chromium-driver)"
        )
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def _tensorboard(logdir, port: int):
    """TensorBoard serving ``logdir`` on 127.0.0.1:``port``, once the run's layout loads."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--reload_interval", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"TensorBoard exited: {process.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(OSError, ValueError):
                if _get_json(f"{url}/data/plugin/custom_scalars/layout").get("category"):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("TensorBoard did not serve the run's layout within 30 s")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _chromium(chromium: str, chromedriver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1920,1200",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def test_stability_tab_in_a_browser(tmp_path):
    chromium, chromedriver = _browser_tools()
    tb = TensorBoardLogger(tmp_path / "logs", name="run")
    t = trainer(max_steps=40, log_every_n_steps=5, logger=tb, callbacks=_callbacks())
    t.fit(TinyClassifier(lr=0.05), loader(classification_data()))

    with (
        _tensorboard(tmp_path / "logs", _free_port()) as url,
        _chromium(chromium, chromedriver) as driver,
    ):
        driver.get(f"{url}/#custom_scalars")
        # wait until every chart of the first row has drawn a line of two points or more
        deadline = time.monotonic() + 30
        while True:
            page = driver.execute_script(_DEEP)
            cards = {c["title"]: c for c in page["cards"]}
            row = {
                tag: next((c for t, c in cards.items() if t.startswith(title)), None)
                for tag, title in FIRST_ROW.items()
            }
            if all(c and max(c["lines"], default=0) >= 2 for c in row.values()):
                break
            assert time.monotonic() < deadline, f"charts not drawn within 30 s: {row}"
            time.sleep(0.5)
        png = driver.get_screenshot_as_png()
        # the data behind each first-row chart: the browser asked for its series, and
        # the same request answers with points for it
        served = {}
        for tag in FIRST_ROW:
            request = next(r for r in page["requests"] if urllib.parse.quote(tag, safe="") in r)
            served[tag] = _get_json(request)["tag_to_events"].get(tag)

    shot = tmp_path / "stability_tab.png"
    shot.write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # a drawn page, not a blank one

    assert page["categories"][0] == "Stability"
    assert "Stability: curvature" in page["categories"]
    # the first row shows in its order: document order, and reading order on the screen
    # (TensorBoard 2.21 shows a category's margin charts in reverse of the written order;
    # the layout writes them reversed to compensate, so a TensorBoard that changes this fails)
    shown = [c["title"] for c in page["cards"] if c["category"] == "Stability"]
    assert len(shown) == len(FIRST_ROW), shown
    for title, expected in zip(shown, FIRST_ROW.values()):
        assert title.startswith(expected), f"first row shown as {shown}"
    on_screen = sorted(page["cards"], key=lambda c: (c["top"], c["left"]))
    assert [c["title"] for c in on_screen] == [c["title"] for c in page["cards"]]
    for tag, card in row.items():
        assert card["category"] == "Stability", card
        assert FIRST_ROW[tag] in card["text"], f"title not drawn: {card['title']}"
        assert len(served[tag] or []) >= 2, f"no series for {tag}: {served[tag]}"
    # TensorBoard's smoothing slider stays at its default (0.6), but the level chart is a
    # margin chart, never smoothed, so it reads whole levels; a regex chart is smoothed
    assert page["smoothing"] > 0
    level = row[TIMELINE.LEVEL]
    assert level["kind"] == "tf-custom-scalar-margin-chart-card"
    assert level["smoothed"] == [False]
    by_dimension = next(c for c in page["cards"] if c["title"].startswith("deviation by dim"))
    assert by_dimension["kind"] == "tf-custom-scalar-multi-line-chart-card"
    assert by_dimension["smoothed"] == [True]
