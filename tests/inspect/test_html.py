"""The HTML page: self-contained, the trace's numbers, and an attention view that answers a hover.

The browser tests run headless Chromium (Debian packages `chromium` and `chromium-driver`) through
selenium; they are skipped, saying why, where either is missing.
"""

import io
import json
import re
import shutil
import tempfile

import pytest
import torch

import glassformer as gf
from glassformer.inspect.examples import two_heads
from glassformer.inspect.html import attention_views, page, trace_html, write_page

TOKENS = torch.tensor([[3, 7, 1, 9, 4]])
LABELS = ["a", "b", "</script>", "d", "e"]


def model(**kw):
    cfg = gf.Config(**{**dict(n_layers=2, d_model=16, n_heads=4, d_vocab=13, n_ctx=8), **kw})
    return gf.Transformer(cfg, seed=0).eval()


def embedded_data(text):
    match = re.search(r'<script type="application/json" id="gf-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


def test_page_is_self_contained_and_carries_every_pattern():
    m = model()
    text = page(m, TOKENS, labels=LABELS)
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://|<link|<script[^>]*\bsrc=|@import", text)  # nothing fetched
    assert text.count("</script>") == 2  # a token label cannot close the data block early
    data = embedded_data(text)
    assert [v["name"] for v in data["views"]] == ["layer 0", "layer 1"]
    with torch.no_grad():
        _, cache = m.run_with_cache(TOKENS)
    for layer, view in enumerate(data["views"]):
        assert view["q"] == view["k"] == LABELS
        torch.testing.assert_close(torch.tensor(view["pattern"]), cache["pattern", layer][0], atol=1e-4, rtol=0)


def test_trace_section_shows_the_worked_example_numbers():
    m, tokens, labels = two_heads()
    section = trace_html(gf.trace(m, tokens, position=2, labels=labels))
    for number in ("0.248", "0.503", "1.376", "1.752"):
        assert f">{number}<" in section
    assert "blocks.0.attn.hook_pattern" in section and "shape (1, 2, 3, 3)" in section


def test_the_page_of_a_sliding_window_soft_capped_model_shows_its_cells_and_banded_patterns():
    m = model(
        positional="rotary",
        norm="rmsnorm",
        norm_position="sandwich",
        act="geglu",
        qk_norm="head",
        sliding_window=2,
        layer_types=["sliding", "full"],
        attn_softcap=2.0,
    )
    text = page(m, TOKENS, labels=LABELS)
    for hook in ("attn.hook_attn_scores_capped", "attn.q_norm.hook_normalized", "ln1_post.hook_normalized"):
        assert f"blocks.0.{hook}" in text
    local, full = (torch.tensor(view["pattern"]) for view in embedded_data(text)["views"])
    assert (local[:, 4, :3] == 0).all() and (full[:, 4] > 0).all()  # layer 0 sees 2 keys, layer 1 all 5


def test_encoder_decoder_views_include_cross_attention_with_source_keys():
    m = model(arch="encoder-decoder", n_layers=1)
    tgt = torch.tensor([[1, 2, 3]])
    views = attention_views(m, TOKENS, LABELS, tgt, ["x", "y", "z"])
    names = [v["name"] for v in views]
    assert names == ["encoder.layer 0", "decoder.layer 0", "decoder.layer 0 cross-attention"]
    cross = views[2]
    assert cross["q"] == ["x", "y", "z"] and cross["k"] == LABELS
    assert torch.tensor(cross["pattern"]).shape == (4, 3, 5)


# --- in a real browser -------------------------------------------------------------------------

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("headless Chromium not installed: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="gf-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # both paths given: nothing downloaded
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def screenshot_colours(driver):
    from PIL import Image

    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    return image, len(image.getcolors(maxcolors=1 << 24))


def key_weights(driver, head=0):
    return [
        float(k.get_attribute("data-weight"))
        for k in driver.find_elements("css selector", f'.head[data-head="{head}"] .key')
    ]


def test_page_renders_in_headless_chromium(browser, tmp_path):
    path = write_page(tmp_path / "page.html", model(), TOKENS, labels=LABELS)
    browser.get(path.as_uri())
    image, colours = screenshot_colours(browser)
    assert image.size[0] > 600 and colours > 50  # text, coloured cells: far from a blank page
    assert browser.find_element("id", "status").text == 'query 4 ("e") in layer 0'
    assert [t.text for t in browser.find_elements("css selector", "#queries .tok")] == LABELS
    assert len(browser.find_elements("css selector", "#heads .head")) == 4
    assert "glassformer trace" in browser.find_element("id", "trace").text
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]  # no script errors


def test_hovering_a_token_shows_where_each_head_looks(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    path = write_page(tmp_path / "page.html", model(), TOKENS, labels=LABELS)
    browser.get(path.as_uri())
    before_png = browser.get_screenshot_as_png()
    last = key_weights(browser)
    assert len(last) == 5 and all(w > 0 for w in last)  # the last token sees every key
    first_token = browser.find_elements("css selector", "#queries .tok")[0]
    ActionChains(browser).move_to_element(first_token).perform()
    assert browser.find_element("id", "status").text == 'query 0 ("a") in layer 0'
    for head in range(4):
        assert key_weights(browser, head) == [1.0, 0.0, 0.0, 0.0, 0.0]  # causal: token 0 sees only itself
    assert "active" in first_token.get_attribute("class")
    assert browser.get_screenshot_as_png() != before_png  # the picture changed too

    Select(browser.find_element("id", "view")).select_by_visible_text("layer 1")
    assert browser.find_element("id", "status").text == 'query 0 ("a") in layer 1'
    ActionChains(browser).move_to_element(browser.find_elements("css selector", "#queries .tok")[3]).perform()
    with torch.no_grad():
        _, cache = model().run_with_cache(TOKENS)
    expected = cache["pattern", 1][0, 2, 3].tolist()  # layer 1, head 2, query 3
    assert key_weights(browser, 2) == pytest.approx(expected, abs=1e-4)


def test_text_gives_the_same_page_labelled_with_the_token_strings(text_model):
    text = "the cat sat on the log"
    tokens = text_model.to_tokens(text)
    labels = text_model.to_str_tokens(tokens)
    by_text = page(text_model, text)
    assert by_text == page(text_model, tokens, labels=labels) == page(text_model, tokens)
    view = embedded_data(by_text)["views"][0]
    assert view["q"] == view["k"] == labels
