"""The dashboard tried as an attacker would (issue 38): a web page the user visits while it runs (DNS
rebinding, cross-site requests), and files planted inside a root by a dataset archive, a shared folder or
another user (links out, links swapped while a request runs, a queue file). Where a header matters the
request goes through a real socket; the races run a thread that swaps links while requests are made."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from conftest import PATIENCE_S
from test_dashboard import TOKEN, reader, run_tree  # noqa: F401  (run_tree: a fixture)
from wanpair.cli import build_parser
from wanpair.dashboard.app import TOKEN_HEADER, create_app
from wanpair.errors import WanpairError

OK = {TOKEN_HEADER: TOKEN}
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for the page"
LORA = "WAN2.2-HighNoise_demo_shapes_v1.safetensors"


@pytest.fixture
def served(run_tree):
    """The dashboard over a trained demo tree, on a real socket: (port, root, run id, a sample's file)."""
    app = create_app([run_tree], token=TOKEN, tick_s=None)
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    client = reader(app)
    (run,) = client.get("/api/runs").get_json()
    sample = client.get(f"/api/runs/{run['id']}").get_json()["samples"][0]["file"]
    yield srv.server_port, run_tree, run["id"], sample
    srv.shutdown()


def _raw(port: int, method: str, path: str, host: str, headers: dict | None = None, body: bytes | None = None):
    """A request with exactly this `Host` header, as a browser sends it for a page whose name was rebound."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PATIENCE_S)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host)
    for key, value in {**(headers or {}), **({"Content-Length": str(len(body))} if body is not None else {})}.items():
        conn.putheader(key, value)
    conn.endheaders(body)
    response = conn.getresponse()
    try:
        return response.status, response.read()
    finally:
        conn.close()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and ".wanpair-dashboard" not in p.parts}


# ---------------------------------------------------------------- 1. DNS rebinding
def test_a_page_that_rebinds_its_name_to_this_machine_reads_and_writes_nothing(served):
    port, root, run_id, sample = served
    reads = ["/", "/api/runs", f"/api/runs/{run_id}", f"/api/runs/{run_id}/lora/{LORA}", f"/files/{run_id}/{sample}",
             "/media?root=0&path=dataset/img_01.png", "/api/folder?root=0&path=dataset", "/api/jobs",
             f"/api/runs/{run_id}/metrics"]
    for url in reads:
        with_token = f"{url}{'&' if '?' in url else '?'}token={TOKEN}"
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"localhost.evil:{port}"):
            status, body = _raw(port, "GET", with_token, host, OK)  # even a page that somehow had the token
            assert status == 403 and b"answers only to" in body, (url, host, status)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost:8888", f"[::1]:{port}"):  # ssh -L 8888:...
            assert _raw(port, "GET", with_token, host, OK)[0] == 200, (url, host)
    before = _snapshot(root)
    body = json.dumps({"root": 0, "path": "dataset/img_01.png", "text": "rebound"}).encode()
    status, _ = _raw(port, "POST", "/api/caption", f"evil.example:{port}", OK | {"Content-Type": "application/json"}, body)
    assert status == 403 and _snapshot(root) == before


def test_a_request_that_writes_from_another_origin_is_refused_even_with_the_token(served):
    port, root, _, _ = served
    here = f"127.0.0.1:{port}"
    body = json.dumps({"root": 0, "path": "dataset/img_01.png", "text": "from elsewhere"}).encode()
    before = _snapshot(root)
    for origin in ("http://evil.example", f"http://localhost:{port}", "null", f"http://{here}.evil.example"):
        status, answer = _raw(port, "POST", "/api/caption", here, OK | {"Origin": origin, "Content-Type": "application/json"}, body)
        assert status == 403, origin
    assert _snapshot(root) == before
    status, _ = _raw(port, "POST", "/api/caption", here, OK | {"Origin": f"http://{here}", "Content-Type": "application/json"}, body)
    assert status == 200 and (root / "dataset" / "img_01.txt").read_text() == "from elsewhere\n"


def test_names_the_user_allows_are_answered(run_tree):
    app = create_app([run_tree], token=TOKEN, tick_s=None, allow_hosts=["gpu-box"])
    client = reader(app)
    assert client.get("/api/runs", base_url="http://gpu-box:7860").status_code == 200
    assert client.get("/api/runs", base_url="http://other-box:7860").status_code == 403
    assert client.get("/api/runs", base_url="http://10.1.2.3:7860").status_code == 200  # an address: not rebindable
    bound = reader(create_app([run_tree], token=TOKEN, tick_s=None, host="gpu.lan"))  # --host names itself
    assert bound.get("/api/runs", base_url="http://gpu.lan:7860").status_code == 200
    args = build_parser().parse_args(["dashboard", "--allow-host", "gpu-box", "--allow-host", "gpu.example.org"])
    assert args.allow_host == ["gpu-box", "gpu.example.org"]


# ---------------------------------------------------------------- 2. a GET starts nothing
def test_no_get_starts_a_process_or_writes_and_one_doctor_runs_at_a_time(demo, monkeypatch):
    app = create_app([demo], token=TOKEN, tick_s=None)
    client = reader(app)
    calls, running, most, mutex = [], [0], [0], threading.Lock()

    def doctor(argv, **kw):
        with mutex:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)
        with mutex:
            running[0] -= 1
            calls.append(argv[-1])
        return subprocess.CompletedProcess(argv, 0, "✓ ready\n", "")

    monkeypatch.setattr(subprocess, "run", doctor)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"a GET started {a}"))
    before = _snapshot(demo)
    for rule in app.url_map.iter_rules():
        if "GET" in rule.methods and rule.endpoint != "static":
            url = rule.rule.replace("<run_id>", "x").replace("<job_id>", "x").replace("<name>", "x").replace("<path:rel>", "x")
            client.get(url, query_string={"root": 0, "path": "wanpair.toml", "task": "t2v-A14B"})
    assert client.get("/api/plan?root=0&path=wanpair.toml").status_code == 405  # a plan is asked with a POST
    assert calls == [] and _snapshot(demo) == before and not (demo / "output").exists()
    (demo / "other.toml").write_text((demo / "wanpair.toml").read_text())
    asks = [("wanpair.toml",)] * 4 + [("other.toml",)] * 2
    answers = []

    def ask(path):
        answers.append(reader(app).post("/api/plan", json={"root": 0, "path": path}, headers=OK).get_json())

    threads = [threading.Thread(target=ask, args=a) for a in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most[0] == 1  # one doctor at a time
    assert sorted(calls) == [str(demo / "other.toml"), str(demo / "wanpair.toml")]  # one per project asked at once
    assert len(answers) == 6 and all(a["ok"] and a["lines"][0] == "✓ ready" for a in answers)


def test_the_doctor_leaves_no_output_folder_behind(demo):
    from wanpair.cli import main

    main(["doctor", str(demo / "wanpair.toml")])
    assert not (demo / "output").exists()


# ---------------------------------------------------------------- 3. links planted inside a root
def test_links_that_lead_out_of_a_run_are_not_read_listed_or_served(run_tree, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_ed25519").write_bytes(SECRET)
    (outside / "metrics.jsonl").write_text(json.dumps({"expert": "high", "step": 7, "loss": 0.123456}) + "\n")
    (outside / "summary.json").write_text(json.dumps({"project": "/home/someone/secret-project.toml"}))
    (outside / "samples").mkdir()
    (outside / "samples" / "high-step000001_00_x_highLora+lowBase.png").write_bytes(SECRET)
    out = run_tree / "output"
    planted = f"WAN2.2-HighNoise_demo_shapes_v1-step999.safetensors"
    (out / planted).symlink_to(outside / "id_ed25519")
    for name, link in (("metrics-out", "metrics.jsonl"), ("samples-out", "samples"), ("summary-out", "summary.json")):
        (out / name).mkdir()
        (out / name / "metrics.jsonl").write_text(json.dumps({"expert": "high", "step": 1, "loss": 1.0}) + "\n")
        target = out / name / link
        target.unlink(missing_ok=True)
        target.symlink_to(outside / link)
    client = reader(create_app([run_tree], token=TOKEN, tick_s=None))
    runs = {r["name"]: r for r in client.get("/api/runs").get_json()}
    detail = client.get(f"/api/runs/{runs['demo_shapes_v1']['id']}").get_json()
    assert planted not in [l["file"] for l in detail["loras"]] and len(detail["loras"]) == 2
    got = client.get(f"/api/runs/{runs['demo_shapes_v1']['id']}/lora/{planted}")
    assert got.status_code == 404 and SECRET not in got.data
    assert client.get(f"/api/runs/{runs['metrics-out']['id']}/metrics").get_json()["rows"] == []
    assert runs["metrics-out"]["experts"]["high"]["done"] == 0
    samples_out = client.get(f"/api/runs/{runs['samples-out']['id']}").get_json()
    assert samples_out["samples"] == []
    got = client.get(f"/files/{runs['samples-out']['id']}/samples/high-step000001_00_x_highLora+lowBase.png")
    assert got.status_code == 404 and SECRET not in got.data
    assert client.get(f"/api/runs/{runs['summary-out']['id']}").get_json()["project"] is None


def test_a_fifo_or_a_link_planted_where_a_file_is_read_does_not_hang_the_page(run_tree, tmp_path):
    out = run_tree / "output"
    os.mkfifo(out / "WAN2.2-LowNoise_demo_shapes_v1-step5.safetensors")
    os.mkfifo(out / ".planted.lock")
    (out / ".linked.lock").symlink_to(tmp_path / "anything.lock")
    os.mkfifo(run_tree / "dataset" / "fifo.png")
    (out / "dangling").mkdir()
    (out / "dangling" / "metrics.jsonl").symlink_to(tmp_path / "gone.jsonl")  # with a summary: once hid every run
    (out / "dangling" / "summary.json").write_text("{}")
    client = reader(create_app([run_tree], token=TOKEN, tick_s=None))
    runs = client.get("/api/runs").get_json()  # probes the locks: a FIFO is not waited on
    (run,) = [r for r in runs if r["name"] == "demo_shapes_v1"]
    assert len(client.get(f"/api/runs/{run['id']}").get_json()["loras"]) == 2
    assert client.get("/media?root=0&path=dataset/fifo.png").status_code == 404
    assert client.application.config["jobs"].busy() == []


def test_planted_lora_files_with_malformed_headers_leave_the_page_whole(run_tree):
    """A header that is JSON but no safetensors table -- a list, entries that are not tables, metadata that is a
    list or holds a number where names are strings -- is a damaged file like any other: listed without facts."""
    out = run_tree / "output"
    headers = [[1, 2], {"w": 5}, {"__metadata__": [1]}, {"__metadata__": {"ss_output_name": 5}},
               {"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}]
    for i, header in enumerate(headers):
        raw = json.dumps(header).encode()
        (out / f"WAN2.2-HighNoise_demo_shapes_v1-step9{i}.safetensors").write_bytes(
            len(raw).to_bytes(8, "little") + raw + b"\0" * 8)
    client = reader(create_app([run_tree], token=TOKEN, tick_s=None))
    (run,) = [r for r in client.get("/api/runs").get_json() if r["name"] == "demo_shapes_v1"]
    got = client.get(f"/api/runs/{run['id']}")
    loras = got.get_json()["loras"] if got.status_code == 200 else []
    assert sorted(lora["expert"] or "damaged" for lora in loras) == ["damaged"] * 5 + ["high", "low"]


def test_huge_planted_files_are_read_only_as_far_as_a_page_needs(run_tree):
    """A metrics file of a gigabyte with no line in it and a LoRA whose header claims 99 MiB (sparse: they cost the
    planter no disk) must not make the dashboard read them whole: unbounded, a larger one exhausts its memory.
    The page stays whole, the metrics are passed over by offset a bounded piece per poll, the LoRA is listed
    without facts, and the run's real rows still come through."""
    import tracemalloc

    out = run_tree / "output"
    (out / "huge").mkdir()
    with open(out / "huge" / "metrics.jsonl", "wb") as f:
        f.truncate(1 << 30)
    header = 99 * 2**20
    with open(out / "WAN2.2-HighNoise_demo_shapes_v1-step97.safetensors", "wb") as f:
        f.write(header.to_bytes(8, "little"))
        f.truncate(8 + header + 8)
    client = reader(create_app([run_tree], token=TOKEN, tick_s=None))
    tracemalloc.start()
    try:
        runs = {r["name"]: r for r in client.get("/api/runs").get_json()}
        huge, demo = runs["huge"], runs["demo_shapes_v1"]
        got = client.get(f"/api/runs/{huge['id']}/metrics").get_json()
        page = client.get(f"/api/runs/{demo['id']}").get_json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB held at once"  # a bounded piece (2 MiB), not the files
    assert got["rows"] == [] and 0 < got["offset"] < 1 << 30  # passed over in part; the next poll goes on
    assert huge["experts"]["high"]["done"] == 0
    assert sorted(lora["expert"] or "damaged" for lora in page["loras"]) == ["damaged", "high", "low"]
    assert demo["experts"]["high"]["done"] > 0  # the real run's rows still read


def test_planted_metrics_and_headers_that_parse_badly_leave_the_runs_whole(run_tree):
    """Metrics lines nested deeper than Python's parser goes, rows whose fields have the wrong types, a piece of a
    million tiny rows, and a LoRA header nested too deep: the run list and pages answer, the planted run shows
    nothing it cannot read, a poll parses a bounded number of lines, and the real run is untouched."""
    import tracemalloc

    from wanpair.dashboard import runs as R

    out = run_tree / "output"
    for name in ("deep", "typed", "tiny"):
        (out / name).mkdir()
    deep = b"[" * 100_000 + b"]" * 100_000
    (out / "deep" / "metrics.jsonl").write_bytes(deep + b"\n" + b'{"expert": "high", "step": 3, "loss": 0.5}\n')
    typed = [{"expert": "high", "step": "3", "loss": 1, "time": "now", "total_steps": "9", "s_per_step": "fast"},
             {"expert": "low", "step": 2, "loss": 1, "time": [1], "total_steps": 8, "s_per_step": None,
              "device": {"a": 1}}, {"expert": ["high"], "step": 1}, {"expert": "high", "total_steps": True}]
    (out / "typed" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in typed))
    (out / "tiny" / "metrics.jsonl").write_bytes(b"{}\n" * 1_000_000)
    header = b"[" * 100_000 + b"]" * 100_000
    (out / "WAN2.2-HighNoise_demo_shapes_v1-step98.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header)
    client = reader(create_app([run_tree], token=TOKEN, tick_s=None))
    tracemalloc.start()
    try:
        got = client.get("/api/runs")
        assert got.status_code == 200
        runs = {r["name"]: r for r in got.get_json()}
        polled = client.get(f"/api/runs/{runs['tiny']['id']}/metrics").get_json()
        page = client.get(f"/api/runs/{runs['demo_shapes_v1']['id']}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert runs["deep"]["experts"]["high"]["done"] == 3  # the line after the deep one still read
    assert runs["typed"]["experts"]["high"] == {"done": 0, "total": None, "s_per_step": None, "eta_s": None,
                                                "device": None}
    assert runs["typed"]["experts"]["low"]["done"] == 2 and runs["typed"]["started"] is None
    assert len(polled["rows"]) == R.METRICS_LINES and polled["offset"] == 3 * R.METRICS_LINES  # the rest: next polls
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB held at once"
    assert page.status_code == 200
    assert sorted(x["expert"] or "damaged" for x in page.get_json()["loras"]) == ["damaged", "high", "low"]
    assert runs["demo_shapes_v1"]["experts"]["high"]["done"] > 0


# ---------------------------------------------------------------- 4. races between the check and the use
class Swapper:
    """A thread that swaps what a path is, as fast as it can, while requests are made."""

    def __init__(self, swap):
        self.swap, self.count, self.error, self._stop = swap, 0, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            while not self._stop.is_set():
                self.swap(self.count)
                self.count += 1
        except OSError as e:  # something the request made got in the way of a swap
            self.error = e

    def __enter__(self):
        self._thread.start()
        return self

    def race(self, request, tries: int = 200, swaps: int = 50, seconds: float = PATIENCE_S) -> list:
        """`request()` again and again while this swaps, until both have happened often enough."""
        out, end = [], time.monotonic() + seconds
        while len(out) < tries or self.count < swaps:
            assert self.error is None and time.monotonic() < end, f"{len(out)} requests, {self.count} swaps, {self.error}"
            out.append(request())
        return out

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def _link_swapper(link: Path, inside: Path, outside: Path):
    def swap(i):
        tmp = link.with_name(f".{link.name}.swap")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(outside if i % 2 else inside)
        os.replace(tmp, link)
    return Swapper(swap)


def _folder_swapper(folder: Path, outside: Path):
    """`folder` a real folder one moment, a link to `outside` the next."""
    parked = folder.with_name(f".{folder.name}.parked")

    def swap(i):
        os.rename(folder, parked)
        os.symlink(outside, folder)
        os.unlink(folder)
        os.rename(parked, folder)
        time.sleep(0.002 * (i % 3))  # a real folder for a while, now and then: requests get through, others race
    return Swapper(swap)


@pytest.fixture
def planted(demo, tmp_path):
    """An image inside the root (in `box/`) and one outside it under the same names, with captions."""
    png = (demo / "dataset" / "img_01.png").read_bytes()
    outside = tmp_path / "outside"
    for folder in (demo / "box", outside):
        folder.mkdir()
        (folder / "a.png").write_bytes(png if folder.name == "box" else png + SECRET)
        (folder / "a.txt").write_text("inside\n" if folder.name == "box" else "outside, private\n")
    return demo, outside


def test_a_link_swapped_while_media_is_read_never_serves_a_file_outside(planted):
    demo, outside = planted
    client = reader(create_app([demo], token=TOKEN, tick_s=None))
    with _link_swapper(demo / "box" / "swap.png", demo / "box" / "a.png", outside / "a.png") as links:
        answers = links.race(lambda: client.get("/media?root=0&path=box/swap.png"))
    with _folder_swapper(demo / "box", outside) as folders:
        answers += folders.race(lambda: client.get("/media?root=0&path=box/a.png"))
    assert not any(SECRET in got.data for got in answers)
    codes = {got.status_code for got in answers}
    assert 200 in codes and codes <= {200, 403, 404}


def test_a_link_swapped_while_a_caption_is_saved_never_writes_outside(planted):
    demo, outside = planted
    client = reader(create_app([demo], token=TOKEN, tick_s=None))
    before = _snapshot(outside)

    def save(media: str):
        return lambda: client.post("/api/caption", json={"root": 0, "path": media, "text": "planted"}, headers=OK)

    with _folder_swapper(demo / "box", outside) as folders:
        answers = folders.race(save("box/a.png"))
    (demo / "box" / "b.png").write_bytes((demo / "box" / "a.png").read_bytes())
    with _link_swapper(demo / "box" / "b.txt", demo / "box" / "b-own.txt", outside / "a.txt") as links:
        answers += links.race(save("box/b.png"))
    assert _snapshot(outside) == before and sorted(p.name for p in outside.iterdir()) == ["a.png", "a.txt"]
    codes = {got.status_code for got in answers}
    assert 200 in codes and codes <= {200, 400, 403, 404}
    assert (demo / "box" / "a.txt").read_text() == "planted\n"


def test_a_folder_swapped_while_a_sample_is_served_never_serves_a_file_outside(run_tree, tmp_path):
    run_dir = next(run_tree.rglob("metrics.jsonl")).parent
    outside = tmp_path / "outside-samples"
    outside.mkdir()
    for f in (run_dir / "samples").iterdir():
        (outside / f.name).write_bytes(SECRET)
    client = reader(create_app([run_tree], token=TOKEN, tick_s=None))
    (run,) = client.get("/api/runs").get_json()
    name = next(f.name for f in (run_dir / "samples").iterdir() if f.suffix == ".png")
    with _folder_swapper(run_dir / "samples", outside) as folders:
        answers = folders.race(lambda: client.get(f"/files/{run['id']}/samples/{name}"))
    assert not any(SECRET in got.data for got in answers) and 200 in {got.status_code for got in answers}


# ---------------------------------------------------------------- 5. a caption that is a link
def test_a_caption_that_is_a_link_is_refused_by_name_and_its_target_kept(demo):
    keep = (demo / "wanpair.toml").read_bytes()
    (demo / "dataset" / "img_01.txt").unlink()
    (demo / "dataset" / "img_01.txt").symlink_to("../wanpair.toml")
    client = reader(create_app([demo], token=TOKEN, tick_s=None))
    got = client.post("/api/caption", json={"root": 0, "path": "dataset/img_01.png", "text": "x"}, headers=OK)
    assert got.status_code == 403 and "img_01.txt is a link (to ../wanpair.toml)" in got.get_json()["error"]
    assert (demo / "wanpair.toml").read_bytes() == keep and (demo / "dataset" / "img_01.txt").is_symlink()


# ---------------------------------------------------------------- 6. a planted queue file
def _plant_queue(root: Path, jobs: list[dict], mode: int = 0o644) -> Path:
    folder = root / ".wanpair-dashboard"
    folder.mkdir(exist_ok=True)
    (folder / "queue.json").write_text(json.dumps({"jobs": jobs}))
    os.chmod(folder / "queue.json", mode)
    return folder / "queue.json"


def test_a_planted_queue_file_starts_nothing_and_runs_only_what_the_page_offers(demo, tmp_path, capsys):
    proof = tmp_path / "ran"
    evil = {"argv": ["caption", str(tmp_path)], "title": "innocent", "cwd": "/", "state": "queued", "id": "aa"}
    _plant_queue(demo, [
        evil,  # the old record: a command line and a folder of any kind
        {"kind": "train", "inputs": {"project_file": str(tmp_path / "x.toml"), "overwrite": False}, "state": "queued"},
        {"kind": "shell", "inputs": {"cmd": f"touch {proof}"}, "state": "queued"},
        {"kind": "caption", "inputs": {"folder": str(demo / "dataset"), "captioner": str(demo / "models"),
                                       "trigger": "x"}, "argv": ["doctor", "/"], "cwd": "/", "state": "queued",
         "id": "../../etc"},
        {"kind": "train", "inputs": {"project_file": str(demo / "wanpair.toml"), "overwrite": True},
         "argv": ["sample", "/"], "cwd": "/", "lock": str(tmp_path / "l"), "state": "queued", "id": "bb"},
    ])
    app = create_app([demo], token=TOKEN, tick_s=0.05)
    try:
        time.sleep(0.5)
        jobs = app.config["jobs"].jobs
        assert [(j.kind, j.state) for j in jobs] == [("train", "held")]  # the rest left out, by name
        held = jobs[0]
        assert held.argv == ["train", str(demo / "wanpair.toml"), "--overwrite"] and held.cwd == str(demo)
        assert held.lock == str(demo / "output" / ".demo_shapes_v1.lock")
        assert not proof.exists() and not (demo / ".wanpair-dashboard" / "logs").exists()  # nothing ran
        err = capsys.readouterr().err
        assert err.count("is left out") == 4 and "outside the dashboard's folders" in err and "'shell'" in err
        shown = reader(app).get("/api/jobs").get_json()
        assert [j["state"] for j in shown] == ["held"]
    finally:
        app.config["lock"].close()


@pytest.mark.parametrize("how", ["others-can-write", "someone-else's", "a-link"])
def test_a_queue_file_that_is_not_the_users_own_is_refused_by_name(demo, tmp_path, how):
    queue = _plant_queue(demo, [], 0o666 if how == "others-can-write" else 0o644)
    if how == "someone-else's":
        if os.getuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(queue, 12345, 12345)
    if how == "a-link":
        elsewhere = tmp_path / "queue.json"
        shutil.move(queue, elsewhere)
        queue.symlink_to(elsewhere)
    with pytest.raises(WanpairError) as refused:
        create_app([demo], token=TOKEN, tick_s=None)
    assert str(queue) in str(refused.value) and "it is not one this dashboard wrote for you" in str(refused.value)


def test_the_queue_folder_is_the_users_alone(demo):
    app = create_app([demo], token=TOKEN, tick_s=3600)
    try:
        assert (demo / ".wanpair-dashboard").stat().st_mode & 0o077 == 0
    finally:
        app.config["lock"].close()


# ---------------------------------------------------------------- 8. sizes and odd names
def test_large_bodies_and_odd_names_are_refused_with_a_reason_not_a_500(served):
    port, root, run_id, _ = served
    here = f"127.0.0.1:{port}"
    before = _snapshot(root)
    big = json.dumps({"root": 0, "path": "dataset/img_01.png", "text": "x" * (3 << 20)}).encode()
    status, body = _raw(port, "POST", "/api/caption", here, OK | {"Content-Type": "application/json"}, big)
    assert status == 413 and b"larger than 2 MB" in body
    client = reader(create_app([root], token=TOKEN, tick_s=None))
    long_caption = client.post("/api/caption", json={"root": 0, "path": "dataset/img_01.png", "text": "y" * 100_000},
                               headers=OK)
    assert long_caption.status_code == 400 and "at most 64 KiB" in long_caption.get_json()["error"]
    assert _snapshot(root) == before
    for path in ("dataset/img\x00.png", "dataset/" + "a" * 300 + ".png", "a/" * 3000, "\x00"):
        for got in (client.get("/media", query_string={"root": 0, "path": path}),
                    client.get("/api/folder", query_string={"root": 0, "path": path}),
                    client.post("/api/caption", json={"root": 0, "path": path, "text": "x"}, headers=OK),
                    client.post("/api/jobs", json={"root": 0, "path": path}, headers=OK)):
            assert got.status_code in (400, 403) and got.get_json()["error"], (path[:20], got.status_code)
    for url in (f"/files/{run_id}/samples/{'b' * 300}.png", f"/files/{run_id}/samples/a%00.png",
                f"/api/runs/{run_id}/lora/{'c' * 5000}"):
        assert client.get(url).status_code == 404
    assert client.get(f"/api/jobs/{'d' * 5000}/log").status_code == 400


def test_the_dashboards_own_files_are_never_written_through_a_planted_link(demo, tmp_path):
    """A planted `.wanpair-dashboard/dashboard.lock` or `logs` that is a link (or a second name of a file) is refused
    before anything is written through it: the file it names keeps its text."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    folder = demo / ".wanpair-dashboard"
    folder.mkdir(mode=0o700)
    (folder / "dashboard.lock").symlink_to(victim)
    with pytest.raises(OSError):  # O_NOFOLLOW: ELOOP
        create_app([demo], token=TOKEN, tick_s=3600)
    (folder / "dashboard.lock").unlink()
    os.link(victim, folder / "dashboard.lock")  # a hard link: the same file under the dashboard's name
    with pytest.raises(WanpairError, match="a second name of another file"):
        create_app([demo], token=TOKEN, tick_s=3600)
    (folder / "dashboard.lock").unlink()
    (folder / "logs").symlink_to(tmp_path)
    with pytest.raises(WanpairError, match="logs is a link"):
        create_app([demo], token=TOKEN, tick_s=None)
    assert victim.read_text() == "keep me\n" and sorted(p.name for p in tmp_path.iterdir()) == ["demo", "victim.txt"]


def test_the_queue_survives_a_restart_under_a_group_writable_umask(demo):
    """umask 002 (Debian and Ubuntu give each user a private group): the queue the dashboard wrote is its own."""
    from wanpair.dashboard.jobs import JobQueue, train_job
    from wanpair.dashboard.paths import Roots

    old = os.umask(0o002)
    try:
        queue = JobQueue(demo / ".wanpair-dashboard", Roots.of([demo]), busy=lambda: ["busy"])
        queue.add(train_job(demo / "wanpair.toml"))
        assert (demo / ".wanpair-dashboard" / "queue.json").stat().st_mode & 0o077 == 0
        again = JobQueue(demo / ".wanpair-dashboard", Roots.of([demo]), busy=lambda: ["busy"])
        assert [j.state for j in again.jobs] == ["held"]
        with pytest.raises(WanpairError, match="already held"):
            again.add(train_job(demo / "wanpair.toml", overwrite=True))  # a twin of the held one
    finally:
        os.umask(old)


def test_a_queue_from_before_kinds_keeps_its_train_and_caption_jobs(demo):
    from wanpair.dashboard.jobs import JobQueue
    from wanpair.dashboard.paths import Roots

    rows = [{"argv": ["train", str(demo / "wanpair.toml"), "--overwrite"], "title": "t", "cwd": "/", "state": "finished",
             "id": "ab"},
            {"argv": ["caption", str(demo / "dataset"), "--captioner", str(demo / "models" / "c"), "--trigger=sks"],
             "title": "c", "cwd": "/", "state": "queued", "id": "cd"},
            {"argv": ["train", str(demo / "wanpair.toml"), "--resume", "/etc/x"], "state": "queued", "id": "ef"}]
    _plant_queue(demo, rows)
    queue = JobQueue(demo / ".wanpair-dashboard", Roots.of([demo]), busy=lambda: [])
    assert [(j.kind, j.state, j.argv[-1]) for j in queue.jobs] == [("train", "finished", "--overwrite"),
                                                                  ("caption", "held", "--trigger=sks")]


def test_a_planted_dataset_toml_or_fifo_makes_the_page_read_or_wait_on_nothing(demo, tmp_path):
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "p.png").write_bytes((demo / "dataset" / "img_01.png").read_bytes())
    (outside / "p.txt").write_text("a private caption\n")
    (demo / "dataset" / "dataset.toml").write_text(f'[general]\nresolution = [960, 960]\n\n[[datasets]]\n'
                                                    f'image_directory = "{outside}"\n')
    client = reader(create_app([demo], token=TOKEN, tick_s=None))
    got = client.get("/api/folder?root=0&path=dataset").get_json()
    assert "private caption" not in json.dumps(got) and "Check it in a shell: wanpair check" in got["report"]
    os.mkfifo(demo / "dataset.toml.fifo")
    os.mkfifo(demo / "mine.toml")  # where the new run's project would go
    form = {"root": 0, "folder": "dataset", "name": "mine", "task": "t2v-A14B", "models": {}, "train": {}}
    got = client.post("/api/new-run/preview", json=form, headers=OK)
    assert got.status_code == 403 and "is not a regular file" in got.get_json()["error"]
    (demo / "link-models").symlink_to("/")
    shutil.rmtree(demo / "models")
    (demo / "models").symlink_to("/usr")  # a models/ that leads out is not walked
    assert all(v == [] for v in client.get("/api/models?task=t2v-A14B").get_json().values())


def test_a_dataset_toml_that_links_out_or_is_huge_is_not_read_and_planted_captions_and_media_are_bounded(demo,
                                                                                                         tmp_path):
    """Planted in a folder the page checks: a dataset.toml linked to a file outside the roots (its keys would be named
    in the report's error), one of a gigabyte (sparse, no disk), a gigabyte caption, a caption linked out: none is
    read whole or at all -- the report says so by name -- and the page stays whole. (Media are hashed a piece at a
    time: tests/test_dataset.py.)"""
    import tracemalloc

    secret = tmp_path / "registry.toml"
    secret.write_text('[registry]\nhunter2 = "password"\n')
    toml = demo / "dataset" / "dataset.toml"
    toml.unlink(missing_ok=True)
    toml.symlink_to(secret)
    client = reader(create_app([demo], token=TOKEN, tick_s=None))
    report = client.get("/api/folder?root=0&path=dataset").get_json()["report"]
    assert "hunter2" not in report and "registry" not in report
    assert f"{toml} leads outside the dashboard's folders or cannot be read, which the page does not read" in report
    toml.unlink()
    with open(toml, "wb") as f:
        f.write(b"[general]\nresolution = [64, 64]\n")
        f.truncate(1 << 30)
    with open(demo / "dataset" / "img_01.txt", "wb") as f:
        f.truncate(1 << 30)
    tracemalloc.start()
    try:
        report = client.get("/api/folder?root=0&path=dataset").get_json()["report"]
        toml.unlink()
        caption = client.get("/api/folder?root=0&path=dataset").get_json()["report"]  # the recipe's dataset.toml
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB held at once"
    assert f"{toml} is over 1024 KiB, which the page does not read" in report
    assert f"{demo / 'dataset' / 'img_01.txt'}: over 64 KiB, too large for a caption" in caption
    (demo / "dataset" / "img_02.txt").unlink()
    (demo / "dataset" / "img_02.txt").symlink_to(secret)  # a caption the check would read, and name in its errors
    report = client.get("/api/folder?root=0&path=dataset").get_json()["report"]
    assert "hunter2" not in report
    assert f"{demo / 'dataset' / 'img_02.txt'} leads outside the dashboard's folders" in report


def test_odd_requests_are_answered_with_a_reason(served):
    port, root, run_id, _ = served
    here = f"127.0.0.1:{port}"
    client = reader(create_app([root], token=TOKEN, tick_s=None))
    assert client.get("/api/jobs/x/log?lines=-1").status_code == 400  # no job x: named
    assert client.get(f"/api/runs/{run_id}/metrics?offset=-99999999999999999999").status_code == 200
    nested = ("[" * 100_000).encode()
    status, _ = _raw(port, "POST", "/api/caption", here, OK | {"Content-Type": "application/json"}, nested)
    assert status == 400
    status, _ = _raw(port, "POST", "/api/caption", here, OK | {"Origin": "http://[::1", "Content-Type": "application/json"},
                     b"{}")
    assert status == 403
    got = client.post("/api/caption", json={"root": 0, "path": "dataset/\ud800.png", "text": "x"}, headers=OK)
    assert got.status_code in (400, 403)
    got = client.post("/api/new-run", json={"root": 0, "folder": "dataset", "train": {"epochs": "9" * 5000}}, headers=OK)
    assert got.status_code == 400 and "whole number" in got.get_json()["error"]
    for host in ("evil.com@127.0.0.1", "127.0.0.1#x", "127.0.0.1/x", "localhost\t"):
        assert _raw(port, "GET", f"/api/runs?token={TOKEN}", host)[0] in (400, 403), host
    name = "画" * 80 + ".png"  # 240 bytes: a caption's temporary file must still fit NAME_MAX
    (root / "dataset" / name).write_bytes((root / "dataset" / "img_01.png").read_bytes())
    got = client.post("/api/caption", json={"root": 0, "path": f"dataset/{name}", "text": "long name"}, headers=OK)
    assert got.status_code == 200 and (root / "dataset" / ("画" * 80 + ".txt")).read_text() == "long name\n"
