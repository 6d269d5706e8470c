"""`wanpair dashboard` as a person uses it: a real headless Chromium opens the page over a trained demo
run (with samples written by the sampler's own writer), sees the charts, the sample grid and the LoRA
table, and watches the page follow lines appended to metrics.jsonl. Also: nothing outside a run folder
is served, half-written files are survived, and it binds to 127.0.0.1 by default."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from werkzeug.serving import make_server

from conftest import PATIENCE_S
from wanpair.cli import build_parser
from wanpair.dashboard import runs as R
from wanpair.dashboard.app import create_app
from wanpair.sample import save_output
from wanpair.train.metrics import MetricsLog, drop_metrics_after
from wanpair.train.run_lock import run_lock

TOKEN = "test-token"
SHOTS = Path(os.environ.get("WANPAIR_SCREENSHOTS", "")) if os.environ.get("WANPAIR_SCREENSHOTS") else None


@pytest.fixture
def run_tree(trained, tmp_path) -> Path:
    """The trained demo pair, plus samples named and written as training writes them."""
    root = tmp_path / "demo"
    shutil.copytree(trained, root)
    run = next(root.rglob("metrics.jsonl")).parent
    rng = np.random.default_rng(0)
    for step in (9, 18):
        for i, prompt in enumerate(["a red fox in the snow", "a blue teapot"]):
            for expert, combo in (("high", "highLora+lowBase"), ("low", "highLora+lowLora")):
                stem = f"{expert}-step{step:06d}_{i:02d}_{prompt.replace(' ', '_')}_{combo}"
                save_output(rng.random((1, 32, 48, 3)), run / "samples" / stem, {"prompt": prompt}, 16)
    save_output(rng.random((5, 32, 48, 3)), run / "samples" / "low-step000018_02_a_paper_lantern_highLora+lowLora",
                {"prompt": "a paper lantern"}, 16)  # a video sample (MP4)
    return root


@pytest.fixture
def server(run_tree):
    srv = make_server("127.0.0.1", 0, create_app([run_tree], token=TOKEN), threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", run_tree
    srv.shutdown()


def reader(app):
    """A test client of `app` that sends the dashboard's token with every request, as the page does."""
    client = app.test_client()
    client.environ_base["HTTP_X_WANPAIR_TOKEN"] = app.config["token"]
    return client


def _get(url: str, headers: dict | None = None):
    """GET through a real socket, with the token unless `headers` says otherwise."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"X-Wanpair-Token": TOKEN} if headers is None else headers)
    try:
        with urllib.request.urlopen(request, timeout=PATIENCE_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_the_api_describes_the_finished_pair(server):
    url, root = server
    status, body = _get(f"{url}/api/runs")
    (run,) = json.loads(body)
    assert status == 200 and run["state"] == "finished" and run["device"] == "cpu"
    assert run["experts"]["high"]["done"] == run["experts"]["high"]["total"] == 18
    status, body = _get(f"{url}/api/runs/{run['id']}")
    detail = json.loads(body)
    assert {l["expert"] for l in detail["loras"]} == {"high", "low"}
    assert len(detail["samples"]) == 9 and {s["combination"] for s in detail["samples"]} == {"highLora+lowBase", "highLora+lowLora"}
    assert _get(f"{url}/files/{run['id']}/{detail['samples'][0]['file']}")[0] == 200
    video = next(s for s in detail["samples"] if s["video"])
    assert video["prompt"] == "a paper lantern" and _get(f"{url}/files/{run['id']}/{video['file']}")[0] == 200
    assert _get(f"{url}/static/plotly.min.js")[1].startswith(b"/**")  # served from the plotly package: offline


def test_nothing_outside_a_run_folder_is_served(server, tmp_path):
    url, root = server
    run_id = json.loads(_get(f"{url}/api/runs")[1])[0]["id"]
    run_dir = next(root.rglob("metrics.jsonl")).parent
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG private")
    (run_dir / "samples" / "link.png").symlink_to(secret)  # a link leading out of the run
    for rel in ("../../secret.png", "..%2F..%2Fsecret.png", "samples/link.png", "/etc/passwd", "metrics.jsonl",
                "../WAN2.2-HighNoise_demo_shapes_v1.safetensors"):
        assert _get(f"{url}/files/{run_id}/{rel}")[0] == 404, rel
    assert _get(f"{url}/files/unknown-run/samples/x.png")[0] == 404


def test_half_written_metrics_are_read_up_to_the_last_whole_line(tmp_path):
    log = MetricsLog(tmp_path / "run", "high", header={"total_steps": 10, "device": "cpu"})
    log.log({"step": 1, "loss": 1.0, "s_per_step": 0.5})
    log.close()
    path = tmp_path / "run" / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"expert": "high", "step": 2, "lo')  # a line still being written
    got = R.rows_since(R.Run(path.parent))
    rows = got["rows"]
    assert [r["step"] for r in rows] == [1] and got["offset"] < path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'ss": 0.9, "s_per_step": 0.5}\n{torn by a kill}\n')
    more = R.rows_since(R.Run(path.parent), got["offset"], got["file"])["rows"]
    assert [r["step"] for r in more] == [2]  # the rest of the line arrived; the torn one is skipped
    p = R.progress(rows + more, now=time.time())["experts"]["high"]
    assert (p["done"], p["total"], p["s_per_step"], p["eta_s"]) == (2, 10, 0.5, 4.0)


def test_metrics_longer_than_a_read_reach_the_page_piece_by_piece_and_the_summary_shows_the_latest(tmp_path,
                                                                                                     monkeypatch):
    """The dashboard reads a run's metrics a bounded piece at a time (planted files may be huge): a long run's
    rows all reach a poller over several polls, in order, and its summary is where the run is now."""
    monkeypatch.setattr(R, "METRICS_PIECE", 2048)
    monkeypatch.setattr(R, "SUMMARY_PIECES", 2)  # the summary: two pieces from the start, then the last one
    log = MetricsLog(tmp_path / "run", "high", header={"total_steps": 200, "device": "cpu"})
    for step in range(1, 101):
        log.log({"step": step, "loss": 1.0 / step, "s_per_step": 0.5})
    log.close()
    run = R.Run(tmp_path / "run")
    assert run.metrics.stat().st_size > 4 * 2048
    seen, got, polls = [], {"offset": 0, "file": ""}, 0
    while True:
        got = R.rows_since(run, got["offset"], got["file"])
        polls += 1
        if not got["rows"]:
            break
        seen += [r["step"] for r in got["rows"] if "loss" in r]
    assert seen == list(range(1, 101)) and polls > 4
    p = R.summary_of(run)
    assert (p["experts"]["high"]["done"], p["experts"]["high"]["total"]) == (100, 200) and p["started"] is not None


def test_a_summary_past_its_pieces_reads_the_last_piece_from_its_first_whole_line(tmp_path, monkeypatch):
    """Rows of 100 bytes, pieces of 1 000: the last piece starts exactly at a row, which is read, not skipped as the
    rest of a row begun before it."""
    monkeypatch.setattr(R, "METRICS_PIECE", 1000)
    monkeypatch.setattr(R, "SUMMARY_PIECES", 1)
    (tmp_path / "run").mkdir()
    lines = []
    for step in range(100):
        text = json.dumps({"expert": "high", "step": step, "loss": 1.0, "pad": ""})
        lines.append(text.replace('""', '"' + "x" * (99 - len(text)) + '"') + "\n")
    assert {len(x) for x in lines} == {100}
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(lines))
    rows = list(R.summary_rows(R.Run(tmp_path / "run")))
    assert [r["step"] for r in rows] == [*range(10), *range(90, 100)]


def test_a_resume_that_rewrites_the_metrics_starts_the_charts_again(tmp_path):
    """A resume drops the killed run's rows after its last state by writing metrics.jsonl anew (shorter, or
    longer again by the next poll): the page, which reads it by offset, is told to start its series again
    instead of keeping the dropped rows or reading from the middle of a line."""
    run_dir = tmp_path / "out" / "demo"
    path = run_dir / "metrics.jsonl"

    def log(steps):
        log = MetricsLog(run_dir, "high")
        for step in steps:
            log.log({"step": step, "loss": 1.0 / step})
        log.close()

    log(range(1, 9))  # the run killed after step 8, its last state at step 4
    client = reader(create_app([tmp_path]))
    (run,) = client.get("/api/runs").get_json()

    def poll(got):
        url = f"/api/runs/{run['id']}/metrics"
        new = client.get(url, query_string={"offset": got["offset"], "file": got["file"]} if got else {}).get_json()
        return new, [r["step"] for r in new["rows"]]

    got, steps = poll(None)
    assert steps == list(range(1, 9)) and not got["reset"]
    drop_metrics_after(path, "high", 4)  # the resume
    got, steps = poll(got)
    assert got["reset"] and steps == [1, 2, 3, 4]
    drop_metrics_after(path, "high", 2)  # killed and resumed again, then logged past where the page had read
    log(range(3, 12))
    got, steps = poll(got)
    assert got["reset"] and steps == list(range(1, 12))
    log([12])
    got, steps = poll(got)
    assert not got["reset"] and steps == [12]  # a file that only grew: just the new rows
    drop_metrics_after(path, "high", 5)
    got, steps = poll({"offset": got["offset"], "file": ""})  # a page that knows only its offset
    assert got["reset"] and steps == [1, 2, 3, 4, 5]


def test_it_binds_to_this_machine_only_unless_told():
    args = build_parser().parse_args(["dashboard"])
    assert (args.host, args.port, args.dirs) == ("127.0.0.1", 7860, [])


# ---------------------------------------------------------------- in a real browser
def _browser():
    """Headless Chromium through Selenium (Debian's chromium + chromium-driver). Missing: skipped on a
    developer's machine, failed on CI, so that a green CI means the page was seen working."""
    driver_path = shutil.which("chromedriver")
    if not driver_path:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium-driver is not installed; .ci/run installs it (apt-get install chromium chromium-driver)")
        pytest.skip("no chromedriver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def _wait(browser, condition, seconds: float = PATIENCE_S):
    """Until `condition(browser)` holds; an element the page re-rendered meanwhile (the facts refresh every
    10 s) is looked up again at the next poll."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, seconds, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(lambda b: condition(b))


def test_the_page_shows_the_pair_and_follows_a_running_training(server, tmp_path):
    from selenium.webdriver.common.by import By

    url, root = server
    run_dir = next(root.rglob("metrics.jsonl")).parent
    browser = _browser()

    def loss_points(b) -> int:
        return b.execute_script(
            "return document.getElementById('chart-loss').data.filter(t => t.name === 'high-noise loss')[0].x.length")

    try:
        browser.get(f"{url}/?token={TOKEN}")
        row = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#runs tbody tr[data-run]"))[0]
        assert "finished" in row.text and "18 of 18" in row.text
        row.click()
        _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".chart .main-svg")) >= 5)  # five Plotly charts drawn
        assert loss_points(browser) == 18
        grid = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#samples table.grid img"))
        assert len(grid) == 8 and len(browser.find_elements(By.CSS_SELECTOR, "#samples table.grid video")) == 1
        assert _wait(browser, lambda b: all(i.get_attribute("naturalWidth") not in (None, "0") for i in grid))
        loras = browser.find_elements(By.CSS_SELECTOR, "#loras tbody tr")
        assert len(loras) == 2 and "wanpair sample" in browser.find_element(By.ID, "sample-command").text
        assert "--lora-high" in browser.find_element(By.ID, "sample-command").text
        grid[0].click()  # enlarge
        assert _wait(browser, lambda b: b.find_element(By.ID, "viewer").is_displayed())
        if SHOTS:
            SHOTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(SHOTS / "dashboard-sample.png"))
        browser.find_element(By.ID, "viewer").click()
        # the run goes on: training holds its lock again and a resumed high-noise expert appends steps 19..24 of 24
        with run_lock(run_dir.parent, run_dir.name):
            log = MetricsLog(run_dir, "high", header={"total_steps": 24, "device": "cpu"})
            for step in range(19, 25):
                log.log({"step": step, "epoch": 2, "loss": 0.5, "smoothed_loss": 0.5, "lr": 1e-4, "timestep": 900.0,
                         "s_per_step": 0.3, "samples_per_s": 3.3})
            log.close()
            _wait(browser, lambda b: "24 of 24" in b.find_element(By.ID, "progress-high").text)
            _wait(browser, lambda b: "running" in b.find_element(By.CSS_SELECTOR, "#runs tbody tr[data-run]").text)
            assert loss_points(browser) == 24  # the chart grew without a reload
            browser.save_screenshot(str(tmp_path / "dashboard.png"))
            if SHOTS:
                browser.save_screenshot(str(SHOTS / "dashboard.png"))
            assert (tmp_path / "dashboard.png").read_bytes()[:4] == b"\x89PNG"
            drop_metrics_after(run_dir / "metrics.jsonl", "high", 20)  # killed, and resumed from its state at step 20
            _wait(browser, lambda b: loss_points(b) == 20)  # the chart started again without the dropped steps
    finally:
        browser.quit()


def test_a_single_model_run_shows_its_one_lora(trained_wan21, tmp_path):
    """A Wan 2.1 run: one model over all timesteps, so one progress line, one loss curve, and a sample
    command with --lora."""
    from selenium.webdriver.common.by import By

    root = tmp_path / "wan21"
    shutil.copytree(trained_wan21, root)
    run_dir = next(root.rglob("metrics.jsonl")).parent
    save_output(np.random.default_rng(0).random((1, 32, 48, 3)),
                run_dir / "samples" / "full-step000018_00_a_blue_teapot_fullLora", {"prompt": "a blue teapot"}, 16)
    app = create_app([root], token=TOKEN)
    with reader(app) as client:
        (run,) = client.get("/api/runs").get_json()
        assert list(run["experts"]) == ["full"] and run["experts"]["full"]["done"] == 18
        detail = client.get(f"/api/runs/{run['id']}").get_json()
        assert [(l["expert"], l["window"]) for l in detail["loras"]] == [("full", "0,1000")]
        assert [(s["expert"], s["step"], s["combination"]) for s in detail["samples"]] == [("full", 18, "fullLora")]
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    browser = _browser()
    try:
        browser.get(f"http://127.0.0.1:{srv.server_port}/?token={TOKEN}")
        row = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#runs tbody tr[data-run]"))[0]
        assert "18 of 18 (one model)" in row.text
        row.click()
        _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".chart .main-svg")) >= 5)
        assert "full-range: 18 of 18 steps" in browser.find_element(By.ID, "progress-full").text
        names = browser.execute_script("return document.getElementById('chart-loss').data.map(t => t.name)")
        assert "full-range loss" in names and not any("high-noise" in n for n in names)
        _wait(browser, lambda b: "--lora " in b.find_element(By.ID, "sample-command").text)
        assert "--lora-high" not in browser.find_element(By.ID, "sample-command").text
    finally:
        browser.quit()
        srv.shutdown()
