"""The web page at `/` in a real browser: Debian's headless Chromium, driven by Playwright pointed at the
system's browser (nothing downloaded), against a live server on loopback that requires a token.

What a person does, checked by what the page shows: the token asked once, the profiles listed, a plan asked
for through the form and its heat map drawn (each cell's colour read back from the canvas and matched to the
stored plan's bits), an MoE plan's experts with their routed-token shares, the compare charts from stored
plans and evaluations, a job started from the page whose progress moves as its worker reports.

A screenshot of each view is saved under the folder this module prints (`$BITPLAN_WEB_ARTIFACTS`, else a
temporary one); with `BITPLAN_WEB_DOCS=1` they are copied into docs/img/ for docs/web.md.  Where Chromium or
Playwright is missing the tests are skipped, except under $BITPLAN_REQUIRE_BROWSER (`make test` sets it): then
they fail.
"""

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from bitplan.db.store import Store
from bitplan.db.types import CalibrationRef, Evaluation, Module
from bitplan.planner import synthetic
from bitplan.planner.app.service import create_app
from bitplan.planner.app.usecases import run_plan
from bitplan.planner.app.workspace import Workspace
from bitplan.planner.request import PlanRequest

pytestmark = pytest.mark.browser

REQUIRE_BROWSER = "BITPLAN_REQUIRE_BROWSER"
TOKEN = "s3cret-token"
DOCS_IMG = Path(__file__).resolve().parents[3] / "docs" / "img"
# the page's palette at whole widths (app.js PALETTE): what a cell of that many bits must be painted
PALETTE = {2: (215, 48, 39), 3: (252, 141, 89), 4: (254, 224, 139), 8: (26, 152, 80), 16: (44, 123, 182)}
SHARE_BAR = (44, 95, 179)  # #2c5fb3


def _chromium() -> str | None:
    for candidate in (os.environ.get("BITPLAN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (its own browsers are never installed or used)."""
    executable = _chromium()
    missing = None
    if executable is None:
        missing = "Chromium is not installed (apt-get install chromium; `make sysdeps`)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = "Playwright is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get(REQUIRE_BROWSER):
            pytest.fail(f"{REQUIRE_BROWSER} is set and {missing}")
        pytest.skip(missing)
    # the machine's closed network: no background connections, no component updates; root needs no sandbox
    args = ["--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", "--disable-dev-shm-usage"] + (["--no-sandbox"] if os.geteuid() == 0 else [])
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=args, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory, request):
    """The folder the screenshots go to, printed so that CI's log says where they are."""
    folder = Path(os.environ.get("BITPLAN_WEB_ARTIFACTS") or tmp_path_factory.mktemp("web-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nweb page screenshots: {folder}")

    def save(page, name: str) -> Path:
        path = folder / f"web-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if os.environ.get("BITPLAN_WEB_DOCS"):
            DOCS_IMG.mkdir(exist_ok=True)
            shutil.copyfile(path, DOCS_IMG / path.name)
        return path

    return save


def moe_profile():
    """A synthetic MoE profile (8 layers x 8 experts) whose experts carry routed-token counts, uneven."""
    base = synthetic.synthetic_profile(n_layers=8, n_experts=8)
    rng = np.random.default_rng(3)
    tokens = {(layer, e): int(t) for layer in range(8) for e, t in enumerate(rng.dirichlet(np.ones(8) * 0.7) * 4096)}
    modules = [Module(**{**m.model_dump(), "tokens_routed": tokens[(m.layer, m.expert)]}) if m.expert is not None
               else m for m in base.modules]
    return base.model_copy(update={"modules": modules}), tokens


@pytest.fixture(scope="module")
def site(tmp_path_factory, live_server):
    """A live server (token required) over a store holding the dense and the MoE synthetic profiles, plans
    of four allocators at five budgets, and evaluations of two of them; yields (base URL, store, the
    server's one allowed root)."""
    url = str(tmp_path_factory.mktemp("web") / "web.db")
    root = tmp_path_factory.mktemp("web-root").resolve()
    store = Store(url)
    # as a profile measured on the built-in calibration text would read
    store.save_profile(synthetic.synthetic_profile().model_copy(update={
        "calibration": CalibrationRef(name="shakespeare:calib", fingerprint="fp-calib", n_tokens=4096)}))
    moe, _ = moe_profile()
    store.save_profile(moe)
    ws = Workspace(store, progress=False)
    for allocator in ("ilp", "greedy", "closed_form", "uniform"):
        for budget in (2.5, 3.0, 3.5, 4.0, 4.5):
            plan = run_plan(ws, "prof-synthetic", PlanRequest(budget=f"{budget}bpw", allocator=allocator))
            if allocator in ("ilp", "uniform"):
                # a measured perplexity that falls with the bits, worse for uniform
                ppl = 28.0 + 400.0 * 4.0 ** -plan.bits_per_weight * (2.0 if allocator == "uniform" else 1.0)
                store.save_evaluation(Evaluation(plan_id=plan.id, checkpoint=f"/srv/out/{plan.id}",
                                                 corpus="shakespeare-eval", n_tokens=8192, window=512, perplexity=ppl))
    with live_server(create_app(url, token=TOKEN, roots=str(root))) as base:
        yield base, store, root
    store.close()


@pytest.fixture
def page(browser, site):
    """A new tab (its own sessionStorage) at the site, the token given in the dialog; fails the test on any
    error the page's script raised."""
    base, *_ = site
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(base + "/")
    tab.wait_for_selector("#token-dialog[open]")
    tab.fill("#token-input", TOKEN)
    tab.click("#token-form button")
    tab.wait_for_selector("#profiles-table tbody tr")
    yield tab
    context.close()
    assert not errors, errors


def api(site, path: str):
    base, *_ = site
    r = httpx.get(base + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def pixel(page, x: float, y: float) -> tuple[int, int, int]:
    """The colour the heat map's canvas holds at CSS pixel (x, y)."""
    return tuple(page.evaluate("""([x, y]) => {
        const c = document.getElementById('heatmap'), r = window.bitplanHeatmap.ratio;
        return Array.from(c.getContext('2d').getImageData(Math.round(x * r), Math.round(y * r), 1, 1).data.slice(0, 3));
    }""", [x, y]))


# ------------------------------------------------------------------------------------------- tests


def test_the_page_is_served_without_the_token_and_data_is_not(site):
    base, *_ = site
    r = httpx.get(base + "/")
    assert r.status_code == 200 and "<title>bitplan</title>" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(base + "/web/app.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(base + "/v1/profiles").status_code == 401
    assert httpx.get(base + "/web/nope.js", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert httpx.get(base + "/web/..%2Fservice.py", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_token_is_asked_once_and_profiles_listed(browser, site, shots):
    base, *_ = site
    context = browser.new_context(viewport={"width": 1400, "height": 700})
    tab = context.new_page()
    tab.goto(base + "/")
    tab.wait_for_selector("#token-dialog[open]")
    tab.fill("#token-input", "wrong")
    tab.click("#token-form button")
    tab.wait_for_selector("#token-dialog[open]")  # refused: asked again
    assert "401" in tab.inner_text("#error")
    tab.fill("#token-input", TOKEN)
    tab.click("#token-form button")
    tab.wait_for_selector("#profiles-table tbody tr")
    ids = tab.eval_on_selector_all("#profiles-table tbody tr", "rows => rows.map(r => r.dataset.id)")
    assert sorted(ids) == ["prof-synthetic", "prof-synthetic-moe8-8l"]
    row = tab.inner_text('#profiles-table tr[data-id="prof-synthetic"]')
    assert "synthetic" in row and "211" in row and "2b/g64 3b/g64 4b/g64 8b/g64" in row
    assert "shakespeare:calib (4096 tokens)" in row
    # validation: the rank correlation of predicted error and measured perplexity over the 10 evaluated plans
    v = api(site, "/v1/profiles/prof-synthetic/validation")["texts"][0]
    cell = '#profiles-table td.validation[data-id="prof-synthetic"]'
    tab.wait_for_function(f"() => document.querySelector('{cell}').textContent !== ''")
    assert tab.inner_text(cell) == f"ρ {v['spearman_perplexity']:.2f} (perplexity, 10 plans, shakespeare-eval)"
    assert tab.inner_text('#profiles-table td.validation[data-id="prof-synthetic-moe8-8l"]') == ""
    assert tab.evaluate("sessionStorage.getItem('bitplan.token')") == TOKEN
    tab.reload()  # kept for the tab: not asked again
    tab.wait_for_selector("#profiles-table tbody tr")
    assert not tab.evaluate("document.getElementById('token-dialog').open")
    shots(tab, "profiles")
    context.close()


def test_a_plan_from_the_form_is_drawn_as_its_bits(page, site, shots):
    page.click('#profiles-table tr[data-id="prof-synthetic"] button')
    page.wait_for_selector("#view-plan:not([hidden])")
    page.wait_for_function("() => document.getElementById('budget-range').textContent.includes('bpw')")
    page.fill("#budget-value", "3.25")
    page.select_option('select[name="allocator"]', "greedy")
    page.fill('input[name="pins"]', "lm_head>=8")
    page.click("#plan-submit")
    page.wait_for_function("() => window.bitplanHeatmap && document.getElementById('heatmap').dataset.plan")
    heat = page.evaluate("window.bitplanHeatmap")
    plan = api(site, f"/v1/plans/{heat['planId']}")
    assert (plan["budget"], plan["allocator"], plan["pins"]) == ("3.25bpw", "greedy", ["lm_head>=8"])
    assert plan["bits_per_weight"] <= 3.25
    dense = [c for c in heat["cells"] if c["kind"] == "dense"]
    other = [c for c in heat["cells"] if c["kind"] == "other"]
    assert len(dense) == 30 * 7 and [c["names"] for c in other] == [["lm_head"]]
    assert other[0]["bits"] == plan["assignment"]["lm_head"]["bits"] == 8
    # every cell holds its module's bits, painted in that width's colour
    for c in dense + other:
        (name,) = c["names"]
        bits = plan["assignment"][name]["bits"]
        assert c["bits"] == bits, name
        assert pixel(page, c["x"] + 2, c["y"] + 2) == PALETTE[bits], name
    assert {c["bits"] for c in dense} >= {2, 3, 4}  # a mixed plan, not one colour
    assert page.inner_text('#plan-summary dd[data-key="size"]') == f"{plan['size_mib']:.2f} MiB"
    with page.expect_download() as got:
        page.click("#plan-download")
    assert got.value.suggested_filename == f"{plan['id']}.json"
    assert json.loads(Path(got.value.path()).read_text())["assignment"] == plan["assignment"]
    page.hover("#heatmap", position={"x": dense[0]["x"] + 3, "y": dense[0]["y"] + 3})
    assert page.inner_text("#heatmap-tip").startswith(f"layer 0 · {dense[0]['role']}: ")
    shots(page, "plan")


def test_an_moe_plan_shows_experts_and_their_routed_share(page, site, shots):
    _, tokens = moe_profile()
    page.evaluate("location.hash = '#plan/prof-synthetic-moe8-8l'")
    page.wait_for_function("() => document.getElementById('budget-range').textContent.includes('bpw')")
    page.check('input[name="unit"][value="MiB"]')
    page.wait_for_function("() => document.getElementById('budget-range').textContent.includes('MiB')")
    page.click("#plan-submit")
    page.wait_for_function("() => window.bitplanHeatmap && window.bitplanHeatmap.cells.some(c => c.kind === 'expert')")
    heat = page.evaluate("window.bitplanHeatmap")
    plan = api(site, f"/v1/plans/{heat['planId']}")
    assert plan["budget"].endswith("MiB") and plan["profile_id"] == "prof-synthetic-moe8-8l"
    experts = [c for c in heat["cells"] if c["kind"] == "expert"]
    assert len(experts) == 8 * 8
    for c in experts:
        layer, e = c["layer"], c["expert"]
        assert c["share"] == pytest.approx(tokens[(layer, e)] / sum(tokens[(layer, k)] for k in range(8)))
        bits = [plan["assignment"][n]["bits"] for n in c["names"]]
        assert len(bits) == 3 and c["bits"] == pytest.approx(np.average(bits, weights=[
            576 * 1536, 576 * 1536, 576 * 1536]))
        if bits[0] == bits[1] == bits[2]:
            assert pixel(page, c["x"] + 2, c["y"] + 2) == PALETTE[bits[0]]
    # the busiest expert of layer 0 has a full-width share bar under its cell
    top = max((c for c in experts if c["layer"] == 0), key=lambda c: c["share"])
    assert pixel(page, top["x"] + top["w"] - 2, top["y"] + top["h"] + 3) == SHARE_BAR
    shots(page, "moe")


def test_compare_draws_a_line_per_allocator(page, site, shots):
    page.evaluate("location.hash = '#compare'")
    page.select_option("#compare-profile", "prof-synthetic")
    page.wait_for_function("() => window.bitplanCharts && window.bitplanCharts.measured.series.length")
    charts = page.evaluate("window.bitplanCharts")
    plans = api(site, "/v1/plans?profile_id=prof-synthetic&limit=500")["items"]
    by_allocator: dict[str, list] = {}
    for p in plans:
        by_allocator.setdefault(p["allocator"], []).append([p["bits_per_weight"], p["predicted_error"]])
    assert {s["name"]: sorted(s["points"]) for s in charts["predicted"]["series"]} == \
        {k: sorted(v) for k, v in by_allocator.items()}
    assert sorted(s["name"] for s in charts["measured"]["series"]) == ["ilp", "uniform"]
    assert all(len(s["points"]) == 5 for s in charts["measured"]["series"])
    errors = [p["predicted_error"] for p in plans]
    assert charts["predicted"]["log"] == (max(errors) / min(errors) > 100)  # a log scale where they span decades
    inked = page.evaluate("""() => {
        const c = document.getElementById('chart-predicted');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] && (d[i] < 200 || d[i + 1] < 200)) n++;
        return n;
    }""")
    assert inked > 2000  # lines, points and labels, not an empty frame
    assert "plans, 10 evaluated" in page.inner_text("#compare-note")
    shots(page, "compare")


def test_a_job_started_on_the_page_shows_its_progress_live(page, site, shots):
    _, store, _ = site
    page.evaluate("location.hash = '#jobs'")
    page.wait_for_selector("#view-jobs:not([hidden])")
    # bad input first: one line in the banner, nothing queued
    page.select_option("#job-kind", "apply")
    page.fill('#job-form [name="plan"]', "plan-nope")
    page.fill('#job-form [name="out"]', "out")
    page.click("#job-form button[type=submit]")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error").startswith("404: no plan with id 'plan-nope' in the store")
    # a profile job of the embedded model: queued, then moved by a worker that this test plays
    page.select_option("#job-kind", "profile")
    page.fill('#job-form [name="tokens"]', "512")
    page.select_option('#job-form [name="estimator"]', "fisher")
    page.click("#job-form button[type=submit]")
    page.wait_for_selector('#jobs-table tr[data-state="queued"]')
    job_id = page.get_attribute('#jobs-table tr[data-state="queued"]', "data-id")
    assert store.get_job(job_id)["params"]["tokens"] == 512 and store.get_job(job_id)["params"]["estimator"] == "fisher"
    assert page.is_hidden("#error")
    job = store.claim_job("test-worker")
    assert job["id"] == job_id
    store.heartbeat_job(job_id, "test-worker", progress=0.4, message="error tables: 84/211 module, ETA 31 s")
    row = f'#jobs-table tr[data-id="{job_id}"]'
    page.wait_for_selector(f'{row}[data-state="running"]')
    page.wait_for_function(f"() => document.querySelector('{row}').innerText.includes('40 %')")
    assert "error tables: 84/211 module" in page.inner_text(row)
    assert page.evaluate(f"document.querySelector('{row} progress').value") == pytest.approx(0.4)
    shots(page, "jobs")
    store.heartbeat_job(job_id, "test-worker", progress=0.75, message="error tables: 158/211 module, ETA 9 s")
    page.wait_for_function(f"() => document.querySelector('{row}').innerText.includes('75 %')")
    store.finish_job(job_id, "test-worker", "succeeded", result_id="prof-synthetic")
    page.wait_for_selector(f'{row}[data-state="succeeded"]')
    assert "100 %" in page.inner_text(row) and "prof-synthetic" in page.inner_text(row)


def test_a_plans_export_is_applied_as_a_job_and_downloaded(page, site, shots):
    """From the plan's view to a job with a prefilled output under the server's root, then the checkpoint
    the job wrote downloaded from its row (a tar of the folder) through the token-carrying fetch."""
    import tarfile

    _, store, root = site
    page.evaluate("location.hash = '#plan/prof-synthetic'")
    page.wait_for_selector("#plans-table tbody tr")
    plan = store.get_plan(page.get_attribute("#plans-table tbody tr", "data-id"))
    page.click(f'#plans-table tr[data-id="{plan.id}"] button')
    page.wait_for_function(f"() => window.bitplanHeatmap && window.bitplanHeatmap.planId === '{plan.id}'")
    page.click("#plan-apply")
    page.wait_for_selector("#view-jobs:not([hidden])")
    page.wait_for_function("() => document.getElementById('server-roots').textContent !== ''")
    assert page.inner_text("#server-roots") == str(root)
    assert page.input_value('#job-form [name="out"]') == f"exports/{plan.id}-bitplan"
    page.select_option('#job-form [name="format"]', "gguf")
    assert page.input_value('#job-form [name="out"]') == f"exports/{plan.id}-gguf.gguf"
    page.select_option('#job-form [name="format"]', "compressed-tensors")
    page.click("#job-form button[type=submit]")
    page.wait_for_selector('#jobs-table tr[data-state="queued"]')
    job_id = page.get_attribute('#jobs-table tr[data-state="queued"]', "data-id")
    job = store.get_job(job_id)
    out = Path(job["params"]["out"])
    assert out == root / "exports" / f"{plan.id}-compressed-tensors" and job["params"]["format"] == "compressed-tensors"
    # the worker this test plays writes the folder and reports it
    assert store.claim_job("test-worker")["id"] == job_id
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"quantization_config": {}}')
    (out / "model.safetensors").write_bytes(os.urandom(4096))
    store.finish_job(job_id, "test-worker", "succeeded", result_id=plan.id, result={"checkpoint": str(out)})
    row = f'#jobs-table tr[data-id="{job_id}"]'
    page.wait_for_selector(f"{row} button.download")
    with page.expect_download() as got:
        page.click(f"{row} button.download")
    assert got.value.suggested_filename == f"{out.name}.tar"
    with tarfile.open(got.value.path()) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert files == {f"{out.name}/{f.name}": f.read_bytes() for f in out.iterdir()}
    shots(page, "export")


def test_the_page_files_ship_in_the_package():
    pyproject = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
    assert '"bitplan.planner.app" = ["web/*"]' in pyproject
    from bitplan.planner.app.service import WEB_FILES

    assert {"/web/index.html", "/web/app.js", "/web/style.css"} <= set(WEB_FILES)
    html = WEB_FILES["/web/index.html"].read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere
