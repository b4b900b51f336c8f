"""The feature dashboard in a real browser: headless Chromium (Debian's chromium and
chromium-driver, installed by ``make system-deps``) driven by Selenium loads the site from
a local web server and checks what a reader sees: the index table and its search, a feature
page with highlighted tokens and the logit table, an expert page, and no JavaScript errors.

One screenshot per page type is kept in ``test-artifacts/dashboard/`` (ignored by git).
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from switch_sae import SwitchSAE, SwitchSAEConfig
from switch_sae.dashboard import DashboardConfig, build_dashboard

from lm_models import D_MODEL, D_VOCAB, MODEL_KINDS, tiny_model

pytest.importorskip("selenium", reason="the browser test needs the [test] extra (selenium)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
N_EXPERTS, D_EXPERT, PAGE_SIZE = 3, 100, 50
LOGIT_TOKENS = 5


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    lm = tiny_model(MODEL_KINDS[0])
    torch.manual_seed(0)
    sae = SwitchSAE(SwitchSAEConfig(d_in=D_MODEL, n_experts=N_EXPERTS, d_expert=D_EXPERT, k=4))
    tokens = torch.randint(1, D_VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    cfg = DashboardConfig(top_examples=4, sample_size=10, logit_tokens=LOGIT_TOKENS, neighbours=4)
    out = tmp_path_factory.mktemp("dashboard") / "site"
    build_dashboard(sae, lm, tokens, "blocks.1.hook_resid_post", out, cfg, title="browser test", progress=False)
    return out


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver_path, "chromium and chromedriver are missing: run `make system-deps` (Debian: chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_path)  # never downloads a driver
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=30):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def console_errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def clear(field):
    """Empty a text field with keystrokes (``WebElement.clear`` fires no ``input`` event)."""
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)


def table_rows(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#feature-table tbody tr")


def test_index_lists_searches_and_sorts(browser, server):
    browser.get(f"{server}/index.html")
    d_sae = N_EXPERTS * D_EXPERT
    wait_for(browser, lambda d: d.find_element(By.ID, "table-status").text == f"{d_sae} features")
    assert len(table_rows(browser)) == PAGE_SIZE
    assert f"{d_sae} matching" in browser.find_element(By.ID, "page-status").text
    assert browser.find_elements(By.CSS_SELECTOR, "#density .plot-container")  # Plotly drew the histogram
    screenshot(browser, "index")

    browser.find_element(By.ID, "next").click()
    assert table_rows(browser)[0].find_element(By.TAG_NAME, "td").text == f"#{PAGE_SIZE}"

    search = browser.find_element(By.ID, "search")
    search.send_keys("e2")  # the features of expert 2
    wait_for(browser, lambda d: f"{D_EXPERT} matching" in d.find_element(By.ID, "page-status").text)
    experts = {row.find_elements(By.TAG_NAME, "td")[1].text for row in table_rows(browser)}
    assert experts == {"2"}
    clear(search)
    search.send_keys("123")
    wait_for(browser, lambda d: len(table_rows(d)) == 1)
    assert table_rows(browser)[0].find_element(By.TAG_NAME, "td").text == "#123"

    clear(search)
    wait_for(browser, lambda d: f"· {d_sae} matching" in d.find_element(By.ID, "page-status").text)
    frequency_header = browser.find_elements(By.CSS_SELECTOR, "#feature-table th")[2]
    frequency_header.click()  # descending firing frequency
    values = [float(row.find_elements(By.TAG_NAME, "td")[2].text) for row in table_rows(browser)]
    assert values == sorted(values, reverse=True) and values[0] > 0
    assert console_errors(browser) == []


def test_feature_page_highlights_tokens_and_shows_logits(browser, server):
    browser.get(f"{server}/index.html")
    wait_for(browser, lambda d: "features" in d.find_element(By.ID, "table-status").text and "loading" not in d.find_element(By.ID, "table-status").text)
    browser.find_elements(By.CSS_SELECTOR, "#feature-table th")[2].click()  # most frequent first: it fired
    table_rows(browser)[0].find_element(By.TAG_NAME, "a").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#top-examples .tok.hl"))
    assert browser.find_elements(By.CSS_SELECTOR, "#top-examples .tok.active")
    logit_rows = browser.find_elements(By.CSS_SELECTOR, "#logits tbody tr")
    assert len(logit_rows) == LOGIT_TOKENS
    assert all(row.find_elements(By.TAG_NAME, "td")[1].text.startswith("+") for row in logit_rows)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr")) == 4
    assert browser.find_elements(By.CSS_SELECTOR, "#histogram .plot-container")
    assert browser.find_element(By.ID, "routing").is_displayed()  # a Switch SAE: the routing panel
    assert browser.find_elements(By.CSS_SELECTOR, "#bands h3")
    screenshot(browser, "feature")
    assert console_errors(browser) == []


def test_expert_page_shows_load_similarity_and_its_features(browser, server):
    browser.get(f"{server}/experts.html")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#similarity .plot-container"))
    browser.get(f"{server}/experts/expert_1.html")
    wait_for(browser, lambda d: d.find_element(By.ID, "table-status").text == f"{D_EXPERT} features")
    ids = [int(row.find_element(By.TAG_NAME, "td").text[1:]) for row in table_rows(browser)]
    assert ids == list(range(D_EXPERT, D_EXPERT + PAGE_SIZE))
    screenshot(browser, "expert")
    assert console_errors(browser) == []
