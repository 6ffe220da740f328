"""report.html in a real headless browser (Debian's Chromium driven by Playwright): the table
has a row per method and sorts on a click, the scatter has a point per method on every axis."""

from __future__ import annotations

import shutil

import pytest

from deltatune.compare.answer import answer, mark_ties
from deltatune.compare.page import COSTS, write_page

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: `make test` installs it (as root)")


def row(method: str, accuracy: float, stored: int, seconds: float, verdict: str = "converged") -> dict:
    return {"method": method, "model": "minilm-l6", "train_size": None, "seeds": [42], "metric": "accuracy",
            "accuracy": accuracy, "accuracy_std": 0.0, "f1": accuracy - 0.01, "f1_std": 0.0,
            "per_seed": {"42": accuracy}, "learning_rate": 1e-3, "verdict": verdict, "stored_params": stored,
            "not_stored_params": 0, "adapter_bytes": 4 * stored, "train_seconds": seconds, "step_seconds": 0.1,
            "peak_memory_mb": 900.0 + seconds, "latency_ratio": 1.0 + seconds / 100,
            "merged_latency_ratio": None, "forgetting": 0.01}


@pytest.fixture()
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    rows = [row("full", 0.84, 22_713_986, 60), row("lora", 0.83, 222_338, 30),
            row("prompt", 0.57, 156_290, 45, "not learning"), row("bitfit", 0.80, 174_338, 28)]
    rows[3].update(forgetting=None, notes={"forgetting": 'failed: RuntimeError: no "hidden" <states>'})
    mark_ties(rows, "accuracy")
    path = write_page(tmp_path / "report.html", {"rows": rows, "answers": [
        {"model": "minilm-l6", "train_size": None, **answer(rows, "accuracy")}]})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        tab = browser.new_page()
        errors = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.goto(path.as_uri())
        yield tab
        browser.close()
        assert errors == []


def test_the_table_sorts_by_the_clicked_column(page):
    def methods():
        return page.locator("#table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.method)")

    assert methods() == ["full", "lora", "bitfit", "prompt"]  # best accuracy first
    page.locator("#table th", has_text="stored params").first.click()  # descending first
    assert methods() == ["full", "lora", "bitfit", "prompt"]
    page.locator("#table th", has_text="stored params").first.click()  # again: ascending
    assert methods() == ["prompt", "bitfit", "lora", "full"]
    page.locator("#table th", has_text="train s").click()
    assert methods() == ["full", "prompt", "lora", "bitfit"]


def test_the_scatter_has_a_point_per_method_on_every_cost_axis(page):
    for key, _, _ in COSTS:
        page.select_option("#cost", key)
        points = page.locator("circle.point")
        assert points.count() == 4
        assert sorted(points.evaluate_all("ps => ps.map(p => p.dataset.method)")) == ["bitfit", "full", "lora", "prompt"]
    # the best-quality point is highest (smallest y on screen), the majority-class one lowest
    ys = {m: float(page.locator(f"circle.point[data-method={m}]").get_attribute("cy")) for m in ("full", "prompt")}
    assert ys["full"] < ys["prompt"]
    assert "best accuracy: full" in page.locator("#answer").inner_text()


def test_a_measurement_that_failed_says_so_in_its_cell(page):
    column = page.locator("#table th").evaluate_all("ths => ths.map(th => th.dataset.key)").index("forgetting")
    cell = page.locator("#table tbody tr[data-method=bitfit] td").nth(column)
    assert cell.inner_text() == "failed"
    assert cell.locator("span").get_attribute("title") == 'failed: RuntimeError: no "hidden" <states>'
    assert page.locator("#table tbody tr[data-method=lora] td").nth(column).inner_text() == "0.01"
