"""The page of ``ctfreid serve`` in real headless Chromium (Debian's chromium + chromium-driver via selenium):
choose a gallery crop as the query, it comes first; a click on a hit searches with that item; erase the crop
from the page, it is gone from the next search."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from test_serve_api import Server  # noqa: E402 - the server (run_dir comes from conftest)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM or not DRIVER:
        pytest.skip("no Chromium here: apt-get install -y chromium chromium-driver (.ci/run does)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_page_finds_a_gallery_crop_first_and_forgets_it_after_erasure(run_dir, synth_root, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    files = sorted((synth_root / "bounding_box_test").glob("*.jpg"))[:12]
    with Server(tmp_path / "store", run_dir) as srv:
        r = srv.client.post("/v1/items", files=[("images", (f.name, f.read_bytes(), "image/jpeg")) for f in files],
                            data={"metadata": json.dumps([{"camera": 1 + i % 3, "time": 1.7e9 + i}
                                                          for i in range(len(files))])})
        ids = r.json()["ids"]
        query, qid = files[4], ids[4]
        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: "items" in d.find_element(By.ID, "stats").text)
        browser.find_element(By.ID, "file").send_keys(str(query))

        def search() -> list[int]:
            browser.find_element(By.ID, "search").click()
            wait.until(lambda d: "hits in" in d.find_element(By.ID, "status").text)
            return [int(e.get_attribute("data-id")) for e in browser.find_elements(By.CSS_SELECTOR, "#hits .hit")]

        hits = search()
        assert hits[0] == qid and len(hits) == min(10, len(ids))
        first = browser.find_elements(By.CSS_SELECTOR, "#hits .hit")[0].text
        assert f"#{qid} d=0" in first and "cam 2" in first
        assert "candidates per stage" in browser.find_element(By.ID, "candidates").text
        # a click on a hit searches with that stored item: the API's answer for it, the item left out
        other = hits[1]
        browser.find_elements(By.CSS_SELECTOR, "#hits .hit")[1].click()
        wait.until(lambda d: f"more like #{other}:" in d.find_element(By.ID, "status").text)
        shown = [int(e.get_attribute("data-id")) for e in browser.find_elements(By.CSS_SELECTOR, "#hits .hit")]
        want = srv.client.post("/v1/search", json={"items": [other], "k": 10}).json()["queries"][0]["hits"]
        assert shown == [h["id"] for h in want] and other not in shown and len(shown) == min(10, len(ids) - 1)
        browser.find_element(By.ID, "erase-id").send_keys(str(qid))
        browser.find_element(By.ID, "erase-item").click()
        wait.until(lambda d: "erased 1" in d.find_element(By.ID, "receipt").text)
        hits = search()
        assert qid not in hits and len(hits) == min(10, len(ids) - 1)
        assert srv.client.get(f"/v1/items/{qid}").status_code == 404
