"""The report a researcher would show a colleague: tiny sweep, swap, ablation and trajectory
reports built through the CLI on the toy backbones, read as HTML and opened in headless
Chromium (no console errors, every image loaded, the random-weights banner, no empty table,
the verdicts in words, the ablation heatmap, the click-to-enlarge view), with full-page
screenshots saved to the test's tmp_path and, with ``ADAPTERSWAP_SCREENSHOTS=<dir>``, there."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_sweep import _has_playwright, chromium_path

from adapterswap.cli import main
from adapterswap.sweep.analysis import delta_verdict
from adapterswap.sweep.report import _pyplot, _tidy_axis, build_report, plural

METRICS = "sharpness,contrast,latency,toy-colour-match"
COMMON = ["--preset", "tiny", "--metrics", METRICS, "--timing-repeats", "2"]
COMMANDS = {
    "sweep": ["sweep", "--backbone", "toy-dev", "--backbone", "toy-fast",
              "--steps", "1,2,3,4,8", "--seeds", "0,1,2"],
    "swap": ["swap", "--from", "toy-dev", "--to", "toy-fast", "--seeds", "0,1,2"],
    "ablate": ["ablate", "--backbone", "toy-dev", "--seeds", "0,1,2", "--scales", "0.5,1",
               "--windows", "0-1,0-0.5"],
    "trajectory": ["trajectory", "--backbone", "toy-dev", "--seeds", "0,1"],
}
VERDICTS = ("better", "worse", "no significant difference", "n too small to tell")


@pytest.fixture(scope="module")
def reports(tmp_path_factory, toy_plugin):
    """One tiny report per command, built by the CLI."""
    root = tmp_path_factory.mktemp("reports")
    built = {}
    for kind, args in COMMANDS.items():
        out = root / kind
        result = CliRunner().invoke(main, [*args, *COMMON, "--out", str(out)])
        assert result.exit_code == 0, (kind, result.output, result.exception)
        built[kind] = out / "report.html"
    return built


def _verdicts(page: str) -> str:
    match = re.search(r'<ul class="glance" id="verdicts">(.*?)</ul>', page, re.S)
    assert match, "no verdicts at the top of the page"
    return re.sub(r"<[^>]+>", "", match.group(1))


# -- words and numbers -----------------------------------------------------------------------------
def test_a_paired_delta_has_a_verdict_in_words():
    assert delta_verdict({"ci_low": 0.01, "ci_high": 0.05}, True) == "better"
    assert delta_verdict({"ci_low": 0.01, "ci_high": 0.05}, False) == "worse"
    assert delta_verdict({"ci_low": -0.01, "ci_high": 0.05}, True) == "no significant difference"
    assert delta_verdict({"ci_low": None, "ci_high": None}, True) == "n too small to tell"
    assert delta_verdict({"ci_low": -0.05, "ci_high": -0.01}, None) == \
        "lower (direction unknown)"
    assert (plural(1, "step"), plural(2, "step"), plural(1, "cell")) == \
        ("1 step", "2 steps", "1 cell")


@pytest.mark.parametrize("values", [(0.098320, 0.098325, 0.098330), (0.5890, 0.5895, 0.5910),
                                    (944.1, 944.3, 944.2), (0.0004, 0.0009, 0.0016)])
def test_axis_ticks_show_at_most_four_significant_digits(values):
    plt = _pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], values)
    _tidy_axis(ax.yaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    plt.close(fig)
    assert labels and all(len(re.sub(r"\D", "", label).lstrip("0")) <= 4 for label in labels)


# -- the page's content, without a browser ---------------------------------------------------------
@pytest.mark.parametrize("kind", list(COMMANDS))
def test_report_shows_the_run_as_resolved_with_a_banner_and_no_empty_table(reports, kind):
    page = reports[kind].read_text()
    assert 'id="preset-banner"' in page and "meaningless" in page
    # the run as resolved, not the raw spec
    for raw in ("null", "adapter null", "steps []", "device null"):
        assert raw not in page, raw
    assert "<td>cpu</td>" in page and "<td>float32</td>" in page
    assert "tiny:seed0" in page and "<th>steps run</th>" in page
    assert "<td>16x16</td>" in page and "code hash" in page and "adapterswap 0." in page
    assert re.search(r"<td>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d</td>", page)
    # the reference as a thumbnail, every picture embedded once and written once to plots/
    assert 'alt="reference synthetic:0"' in page
    images = re.findall(r'<img[^>]* src="data:image/png;base64,', page)
    plots = list((reports[kind].parent / "plots").glob("*.png"))
    assert len(images) == len(plots)
    # no empty table, no script, singular and plural
    assert "<tbody></tbody>" not in page and "<script" not in page.lower()
    assert not re.search(r"(?<![-.\w])1 (steps|cells|seeds|prompts|references)\b", page)
    assert "True" not in _verdicts(page) and "False" not in _verdicts(page)


def test_sweep_report_recommends_in_words_with_linear_step_plots(reports):
    page = reports["sweep"].read_text()
    verdicts = _verdicts(page)
    assert "toy-dev + toy-adapter" in verdicts
    assert "is enough for toy-colour-match" in verdicts or "No recommendation" in verdicts
    out = reports["sweep"].parent
    assert {"metric-toy-colour-match.png", "metric-latency.png", "pareto.png"} <= {
        p.name for p in (out / "plots").iterdir()}
    assert "<td>1, 2, 3, 4, 8</td>" in page  # the step grid the cells ran
    # one compact per-step table: "mean [CI] (scored/attempted)" per metric
    assert re.search(r"<td>0\.\d+ \[0\.\d+, 0\.\d+\] \(3/3\)</td>", page)
    assert page.count("<h2>Per step</h2>") == 1
    started = time.perf_counter()
    build_report(out)
    assert time.perf_counter() - started < 5.0  # a tiny report builds in well under 5 s


def test_swap_report_says_how_much_faster_and_whether_fidelity_changed(reports):
    page = reports["swap"].read_text()
    verdicts = _verdicts(page)
    assert re.search(r"toy-fast at 2 steps is [\d.]+x (faster|slower) than toy-dev at 8 steps",
                     verdicts)
    assert "toy-colour-match" in verdicts and any(v in verdicts for v in VERDICTS)
    # a single step count per backbone: values in tables, no one-point curves
    plots = {p.name for p in (reports["swap"].parent / "plots").iterdir()}
    assert not any(name.startswith("metric-") for name in plots)
    swap = json.loads((reports["swap"].parent / "swap.json").read_text())
    assert all(d["verdict"] in VERDICTS for d in swap["metrics"].values())


def test_ablation_report_has_the_scale_window_heatmap_and_verdicts(reports):
    page = reports["ablate"].read_text()
    verdicts = _verdicts(page)
    assert "toy-colour-match against adapter off over 4 settings" in verdicts
    assert any(v in verdicts for v in VERDICTS)
    assert 'alt="ablation-toy-dev"' in page
    assert (reports["ablate"].parent / "plots" / "ablation-toy-dev.png").is_file()
    analysis = json.loads((reports["ablate"].parent / "analysis.json").read_text())
    assert {(a["scale"], a["start"], a["end"]) for a in analysis["ablations"]} == {
        (0.5, 0.0, 1.0), (0.5, 0.0, 0.5), (1.0, 0.0, 1.0), (1.0, 0.0, 0.5)}
    assert all(a["verdict"] in VERDICTS for a in analysis["ablations"])


def test_trajectory_report_labels_its_strips_and_states_the_regime(reports):
    page = reports["trajectory"].read_text()
    assert "8-step run" in _verdicts(page)
    assert "x0 previews, step 1 to the last" in page
    assert page.index("Trajectories") < page.index("<h2>Per step</h2>")


# -- the page in a real browser --------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None or not _has_playwright():
        if os.environ.get("ADAPTERSWAP_REQUIRE_BROWSER"):
            pytest.fail("chromium and playwright are required (ADAPTERSWAP_REQUIRE_BROWSER)")
        pytest.skip("headless chromium or playwright not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_report_opens_in_chromium_and_enlarges_an_image(reports, browser, kind, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(reports[kind].as_uri())
    loaded = page.evaluate(
        "Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)")
    empty_tables = page.evaluate(
        "Array.from(document.querySelectorAll('table')).filter(t => "
        "t.querySelectorAll('tbody tr').length === 0).length")
    banner = page.locator("#preset-banner").inner_text()
    verdicts = page.locator("#verdicts").inner_text()
    heatmaps = page.evaluate(
        "Array.from(document.querySelectorAll('img[alt^=\"ablation-\"]'))"
        ".map(i => i.getBoundingClientRect().width)")
    small = page.evaluate(  # grid thumbnails are at least 128 px on screen
        "Array.from(document.querySelectorAll('table.grid img')).filter(i => "
        "i.getBoundingClientRect().width < 128).length")
    # click to enlarge (CSS :target), click again to close; the page does not jump
    thumbnail = page.locator("table.grid figure.tile > a").first
    thumbnail.scroll_into_view_if_needed()
    before = page.evaluate("window.scrollY")
    thumbnail.click()
    enlarged = page.evaluate("document.querySelector(':target img').getBoundingClientRect()"
                             ".width")
    after = page.evaluate("window.scrollY")
    page.mouse.click(5, 5)
    closed = page.evaluate("document.querySelectorAll(':target').length")
    page.evaluate("window.scrollTo(0, 0)")
    shot = tmp_path / f"report-{kind}.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("ADAPTERSWAP_SCREENSHOTS"):
        folder = Path(os.environ["ADAPTERSWAP_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / shot.name)
    page.close()

    assert errors == []
    assert loaded and all(loaded)
    assert len(loaded) == len(list((reports[kind].parent / "plots").glob("*.png")))
    assert all(url.startswith(("file:", "data:")) for url in requests)  # self-contained
    assert empty_tables == 0
    assert "random weights" in banner and "meaningless" in banner
    assert verdicts.strip()
    if kind in ("swap", "ablate"):
        assert any(v in verdicts for v in VERDICTS)
    if kind == "ablate":  # the heatmap at the page's width
        assert len(heatmaps) == 1 and heatmaps[0] > 900
    assert small == 0
    assert enlarged > 400 and after == before and closed == 0
    assert shot.stat().st_size > 10_000
