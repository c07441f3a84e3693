"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): pick and
drop photos, see the result grid with scores and the location estimate, open a result, read
error messages, add a photo. Screenshots go to artifacts/ (git-ignored)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from server_process import ServiceProcess
from service_support import INDEXED, coordinates, small_index

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
KEY = "browser-key"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian chromium is not installed ({CHROMIUM}): "
                                                     "apt-get install chromium"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_photos):
    index_dir = small_index(tmp_path_factory, real_photos, "browser")
    env = {"NETVLAD_INDEX_DIR": index_dir, "NETVLAD_API_KEY": KEY, "NETVLAD_DEVICE": "cpu"}
    process = ServiceProcess(env, log=tmp_path_factory.mktemp("browser-log") / "server.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server.url + "/")
    page.wait_for_selector("#status:has-text('photos indexed')")
    yield page
    context.close()
    outside = [url for url in requests if not url.startswith((server.url, "data:", "blob:"))]
    assert not outside, f"the page fetched outside assets: {outside}"


def test_pick_a_photo_and_see_results(page, real_photos):
    ARTIFACTS.mkdir(exist_ok=True)
    query = real_photos[3]
    page.set_input_files("#query-files", str(query))
    page.click("#search-button")
    page.wait_for_selector("#results li")
    cards = page.locator("#results li")
    assert cards.count() == INDEXED  # top_k 12 > collection size
    first = cards.first.inner_text()
    assert re.match(r"#1 · 1\.000", first), first
    assert query.name in first
    assert "results in" in page.inner_text("#search-message")
    location = page.inner_text("#location")
    assert f"{coordinates(3)['lat']:.5f}, {coordinates(3)['lon']:.5f}" in location
    page.wait_for_function("Array.from(document.querySelectorAll('#results img')).slice(0, 4)"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    page.screenshot(path=str(ARTIFACTS / "service-page-results.png"), full_page=True)

    with page.expect_popup() as popup:
        cards.first.locator("a").click()
    photo = popup.value
    photo.wait_for_load_state()
    assert photo.url.endswith("/v1/images/4/file")
    photo.close()


def test_drop_two_photos_for_a_fused_search(page, real_photos):
    files = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in real_photos[5:7]]
    page.evaluate(
        """files => {
            const transfer = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.data), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], f.name, {type: "image/jpeg"}));
            }
            document.getElementById("drop-zone").dispatchEvent(
                new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        files,
    )
    assert page.locator("#query-previews img").count() == 2
    page.select_option("#fusion", "mean")
    page.fill("#top-k", "3")
    page.click("#search-button")
    page.wait_for_selector("#search-message.ok")
    assert "(2 photos, fusion: mean)" in page.inner_text("#search-message")
    assert page.locator("#results li").count() == 3


def test_errors_are_explained(page, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_bytes(b"definitely not a JPEG")
    page.set_input_files("#query-files", str(fake))
    page.click("#search-button")
    message = page.locator("#search-message.error")
    message.wait_for()
    assert re.match(r"Error 415: holiday\.jpg: not an image", message.inner_text())
    page.screenshot(path=str(ARTIFACTS / "service-page-error.png"))


def test_add_a_photo_with_the_key(page, real_photos):
    assert page.is_visible("#add-panel") and page.is_visible("#key-panel")
    photo = real_photos[INDEXED]
    page.set_input_files("#add-file", str(photo))
    page.fill("#add-name", "added from the page")
    page.click("#add-form button")
    page.wait_for_selector("#add-message.error")
    assert "Error 401" in page.inner_text("#add-message")
    page.fill("#api-key", KEY)
    page.set_input_files("#add-file", str(photo))
    page.fill("#add-name", "added from the page")
    page.fill("#add-lat", "46.2")
    page.fill("#add-lon", "6.1")
    page.click("#add-form button")
    page.wait_for_selector("#add-message.ok")
    assert re.match(r"Added as image \d+\.", page.inner_text("#add-message"))
    page.wait_for_selector(f"#status:has-text('{INDEXED + 1} photos indexed')")


# ------------------------------------------------------------------------------ re-ranking


def test_rerank_choices_are_the_ones_the_index_serves(page):
    options = page.locator("#rerank option")
    assert options.evaluate_all("options => options.map(o => o.value)") == ["none", "aqe"]
    assert page.input_value("#rerank") == "none"


@pytest.fixture(scope="module")
def sift_server(tmp_path_factory, real_photos):
    from test_service_rerank import evidence_index

    index_dir = evidence_index(tmp_path_factory, real_photos, "browser-evidence")
    env = {"NETVLAD_INDEX_DIR": index_dir, "NETVLAD_DEVICE": "cpu"}
    process = ServiceProcess(env, log=tmp_path_factory.mktemp("browser-sift-log") / "server.log").start()
    yield process
    process.stop()


def test_geometric_reranking_draws_the_matched_points(browser, sift_server, real_photos, tmp_path):
    from test_service_rerank import CROPPED, cropped_photo

    ARTIFACTS.mkdir(exist_ok=True)
    query, _ = cropped_photo(real_photos[CROPPED], tmp_path)
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    try:
        page.goto(sift_server.url + "/")
        page.wait_for_selector("#status:has-text('photos indexed')")
        assert "geometric" in page.locator("#rerank option").evaluate_all("options => options.map(o => o.value)")
        page.set_input_files("#query-files", str(query))
        page.select_option("#rerank", "geometric")
        page.click("#search-button")
        page.wait_for_selector("#search-message.ok")
        assert "re-ranked: geometric in" in page.inner_text("#search-message")
        first = page.locator("#results li").first
        assert real_photos[CROPPED].name in first.inner_text()
        assert re.search(r"geometric: \d+ inliers ✓", first.inner_text()), first.inner_text()
        first.locator(".matches-button").click()
        page.wait_for_selector("#matches[open] #matches-view[data-lines]")
        lines = int(page.get_attribute("#matches-view", "data-lines"))
        assert lines >= 10 and page.locator("#matches-view line").count() == lines
        # Both photos are drawn (the query from the user's own file, the result from file_url).
        hrefs = page.locator("#matches-view image").evaluate_all("images => images.map(i => i.getAttribute('href'))")
        assert hrefs[0].startswith("blob:") and hrefs[1].endswith(f"/v1/images/{CROPPED + 1}/file")
        page.wait_for_function("""() => Array.from(document.querySelectorAll('#matches-view line'))
            .every(l => Number(l.getAttribute('x2')) > Number(l.getAttribute('x1')))""")
        assert "matched points" in page.inner_text("#matches-caption")
        page.screenshot(path=str(ARTIFACTS / "service-page-matches.png"))
        page.click("#matches-close")
        assert not page.is_visible("#matches")
    finally:
        context.close()
