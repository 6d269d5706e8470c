"""The dashboard that runs the work: a new run made from a folder in the browser, started, stopped, continued
and queued (the whole flow in headless Chromium on the demo's tiny models); and, over HTTP, what keeps a page
that starts processes and writes files safe: the token, the roots, no overwrite without a confirmation."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from conftest import PATIENCE_S
from test_dashboard import SHOTS, _browser, _wait, reader
from wanpair.dashboard.app import LOCAL_HOSTS, TOKEN_HEADER, create_app, launch_message
from wanpair.dashboard.jobs import ACTIVE, Job, JobQueue, caption_job, process_start, train_job
from wanpair.dashboard.paths import Roots
from wanpair.errors import WanpairError
from wanpair.project import TrainSettings, load_project
from wanpair.train.run_lock import lock_path, run_lock

TOKEN = "test-token"
OK = {TOKEN_HEADER: TOKEN}


def _models(client) -> dict:
    """The first choice of each [models] key, as the page preselects it."""
    return {key: files[0] for key, files in client.get("/api/models?task=t2v-A14B").get_json().items()}


def _new_run(client, name="mine", **train) -> dict:
    return {"root": 0, "folder": "dataset", "name": name, "task": "t2v-A14B", "models": _models(client),
            "train": {"epochs": 1, "validate_every_n_steps": 0, **train}}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def client(demo):
    return reader(create_app([demo], token=TOKEN, tick_s=None))


# ---------------------------------------------------------------- a new run: what it writes
def test_a_new_run_writes_what_init_writes_with_the_chosen_settings(client, demo):
    preview = client.post("/api/new-run/preview", json=_new_run(client, epochs=3, learning_rate="0.002"), headers=OK)
    got = preview.get_json()
    assert preview.status_code == 200 and got["problems"] == [] and got["existing"] == []
    assert got["dataset_toml"] is None  # the demo's own dataset.toml is kept
    assert "epochs = 3  # recipe: 100" in got["project_toml"] and "# rank = 16" in got["project_toml"]
    assert not (demo / "mine.toml").exists()  # a preview writes nothing
    made = client.post("/api/new-run", json=_new_run(client, epochs=3, learning_rate="0.002"), headers=OK)
    assert made.status_code == 200 and made.get_json()["project"] == {"root": 0, "path": "mine.toml"}
    assert (demo / "mine.toml").read_text() == got["project_toml"]
    project, _ = load_project(demo / "mine.toml")
    assert (project.name, project.train.epochs, project.train.rank) == ("mine", 3, TrainSettings().rank)
    assert abs(project.train.learning_rate - 0.002) < 1e-12  # written and read back as the same decimal
    assert project.models.vae.name == "wan_2.1_vae_tiny.safetensors" and project.run_dir == demo / "output" / "mine"


def test_a_setting_the_loader_refuses_is_named_and_nothing_is_written(client, demo):
    before = _snapshot(demo)
    r = client.post("/api/new-run", json=_new_run(client, epochs=0), headers=OK)
    assert r.status_code == 400
    assert f"{demo / 'mine.toml'}: [train] epochs = 0: epochs must be at least 1" in r.get_json()["error"]
    assert _snapshot(demo) == before  # not even the scratch file the loader read


def test_files_that_exist_are_replaced_only_after_the_user_agreed_to_those_files(client, demo):
    assert client.post("/api/new-run", json=_new_run(client), headers=OK).status_code == 200
    first = (demo / "mine.toml").read_text()
    dataset = (demo / "dataset" / "dataset.toml").read_text()
    again = client.post("/api/new-run", json=_new_run(client, epochs=2), headers=OK)
    assert again.status_code == 409 and again.get_json()["confirm"]
    assert again.get_json()["error"] == f"{demo / 'mine.toml'} already exists; replace (as `wanpair init --force`)?"
    assert (demo / "mine.toml").read_text() == first
    agreed = client.post("/api/new-run", json=_new_run(client, epochs=2) | {"replace": True}, headers=OK)
    assert agreed.status_code == 200 and "epochs = 2" in (demo / "mine.toml").read_text()
    assert (demo / "dataset" / "dataset.toml").read_text() == dataset  # the question did not name it: kept
    recipe = client.post("/api/new-run", json=_new_run(client) | {"recipe_dataset": True}, headers=OK)
    assert recipe.status_code == 409 and recipe.get_json()["error"].startswith(
        f"{demo / 'mine.toml'}, {demo / 'dataset' / 'dataset.toml'} already exist; ")
    assert (demo / "dataset" / "dataset.toml").read_text() == dataset
    both = client.post("/api/new-run", json=_new_run(client) | {"recipe_dataset": True, "replace": True}, headers=OK)
    assert both.status_code == 200 and 'resolution = [960, 960]' in (demo / "dataset" / "dataset.toml").read_text()


@pytest.mark.parametrize("bad", [{"train": [1]}, {"models": "vae.safetensors"}], ids=["train", "models"])
def test_a_form_table_that_is_not_an_object_is_refused(client, bad):
    r = client.post("/api/new-run", json=_new_run(client) | bad, headers=OK)
    key, value = next(iter(bad.items()))
    assert r.status_code == 400 and r.get_json()["error"].startswith(f"{key} = {value!r} must be an object")


def test_the_check_report_and_captions_are_shown_and_a_caption_is_edited(client, demo):
    got = client.get("/api/folder?root=0&path=dataset").get_json()
    assert "18 items, 0 errors, 0 warnings" in got["report"] and len(got["items"]) == 18
    first = got["items"][0]
    assert first["media"] == {"root": 0, "path": "dataset/img_01.png"} and first["caption"].startswith("a red circle")
    assert client.get(f"/media?root=0&path={first['preview']['path']}").status_code == 200
    i2v = client.get("/api/folder?root=0&path=dataset&task=i2v-A14B").get_json()  # the form's model picked
    assert any("i2v-A14B learns how a clip goes on" in e for e in i2v["errors"])
    (demo / "dataset" / "img_02.txt").unlink()
    assert "ERROR   " in client.get("/api/folder?root=0&path=dataset").get_json()["report"]  # errors block
    r = client.post("/api/caption", json={"root": 0, "path": "dataset/img_01.png", "text": " a red disc \n"}, headers=OK)
    assert r.status_code == 200 and (demo / "dataset" / "img_01.txt").read_text() == "a red disc\n"
    (demo / "dataset" / "originals").mkdir()  # a folder of images in an image dataset: not a clip of it
    (demo / "dataset" / "originals" / "a.png").write_bytes((demo / "dataset" / "img_01.png").read_bytes())
    r = client.post("/api/caption", json={"root": 0, "path": "dataset/originals", "text": "x"}, headers=OK)
    assert r.status_code == 400 and "is not an image or video of a dataset folder" in r.get_json()["error"]
    assert not (demo / "dataset" / "originals.txt").exists()


def test_weights_linked_from_outside_the_roots_are_not_offered(demo, tmp_path):
    outside = tmp_path / "weights"
    outside.mkdir()
    (outside / "elsewhere.safetensors").write_bytes(b"x")
    (demo / "models" / "elsewhere.safetensors").symlink_to(outside / "elsewhere.safetensors")
    got = reader(create_app([demo], token=TOKEN, tick_s=None)).get("/api/models?task=t2v-A14B")
    assert got.status_code == 200 and got.get_json()["vae"][0]["path"].endswith("wan_2.1_vae_tiny.safetensors")
    assert not any("elsewhere" in f["path"] for files in got.get_json().values() for f in files)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "models").symlink_to(demo / "models")  # the whole models/ folder is a link out of this root
    got = reader(create_app([linked], token=TOKEN, tick_s=None)).get("/api/models?task=t2v-A14B")
    assert got.status_code == 200 and all(files == [] for files in got.get_json().values())


def test_the_plan_is_the_doctor_in_its_own_process_and_a_training_run_does_not_block_queuing(client, demo, monkeypatch):
    """In the dashboard's process, the doctor would keep a CUDA context on every GPU for the dashboard's life;
    while another run trains, its memory plan fails beside it, yet the run can still wait in the queue."""
    import subprocess
    import sys

    calls = []

    def doctor(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, "✗ memory plan: needs 90 GB, 20 GB free\n", "")

    monkeypatch.setattr(subprocess, "run", doctor)
    plan = client.post("/api/plan", json={"root": 0, "path": "wanpair.toml"}, headers=OK).get_json()
    assert calls == [[sys.executable, "-m", "wanpair.cli", "doctor", str(demo / "wanpair.toml")]]
    assert plan == {"ok": False, "lines": ["✗ memory plan: needs 90 GB, 20 GB free",
                                           "· no other training under these folders now"]}
    with run_lock(demo / "output", "other"):
        plan = client.post("/api/plan", json={"root": 0, "path": "wanpair.toml"}, headers=OK).get_json()
    assert plan["ok"] and plan["lines"][-1].startswith("· this plan was measured while other trains: this run "
                                                       "waits in the queue and starts when it ends")


# ---------------------------------------------------------------- safety
WRITES = [("/api/new-run", lambda c: _new_run(c)), ("/api/caption", lambda c: {"root": 0, "path": "dataset/img_01.png",
                                                                               "text": "changed"}),
          ("/api/jobs", lambda c: {"root": 0, "path": "wanpair.toml"})]


@pytest.mark.parametrize("headers", [{}, {TOKEN_HEADER: "wrong"}, {TOKEN_HEADER: ""}, {"Cookie": f"token={TOKEN}"}],
                         ids=["missing", "wrong", "empty", "in-a-cookie"])
def test_writes_and_starts_need_the_token_in_the_header(client, demo, headers):
    before = _snapshot(demo)
    bare = client.application.test_client()  # sends only `headers`
    for url, body in WRITES:
        r = bare.post(url, json=body(client), headers=headers)
        assert r.status_code == 403 and r.get_json()["error"].startswith("refused: a request that writes"), url
        r = bare.post(f"{url}?token={TOKEN}", json=body(client), headers=headers)  # in the URL: not for writes
        assert r.status_code == 403, url
    assert bare.post("/api/jobs/anything/stop", headers=headers).status_code == 403
    assert _snapshot(demo) == before and client.get("/api/jobs").get_json() == []  # nothing written, nothing started
    assert bare.get("/api/runs", headers=headers).status_code == 403  # nor is anything read without the token
    assert bare.get(f"/api/runs?token={TOKEN}").status_code == 200 and client.get("/api/runs").status_code == 200


def test_paths_that_leave_the_roots_are_refused(client, demo, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "img.png").write_bytes((demo / "dataset" / "img_01.png").read_bytes())
    (outside / "img.txt").write_text("private\n")
    (demo / "link-out").symlink_to(outside)  # a link inside the root that leads out of it
    (demo / "dataset" / "img_01.txt").unlink()
    (demo / "dataset" / "img_01.txt").symlink_to(outside / "img.txt")  # a caption that is a link out
    before = _snapshot(demo) | {f"outside/{k}": v for k, v in _snapshot(outside).items()}
    escapes = ["../outside", str(outside), "link-out", "dataset/../../outside", "..\\outside"]
    for path in escapes:
        r = client.post("/api/new-run", json=_new_run(client) | {"folder": path}, headers=OK)
        assert r.status_code == 403, (path, r.get_json())
        media = f"{path}/img.png"
        assert client.post("/api/caption", json={"root": 0, "path": media, "text": "x"}, headers=OK).status_code == 403
        assert client.post("/api/jobs", json={"root": 0, "path": f"{path}/p.toml"}, headers=OK).status_code == 403
        assert client.get("/media", query_string={"root": 0, "path": media}).status_code == 403
        assert client.get("/api/folder", query_string={"root": 0, "path": path}).status_code == 403
    dataset = reader(create_app([demo / "dataset"], token=TOKEN, tick_s=None))  # a root of images
    r = dataset.post("/api/caption", json={"root": 0, "path": ".", "text": "x"}, headers=OK)
    assert r.status_code == 403 and "is a folder the dashboard was started on" in r.get_json()["error"]
    assert not (demo / "dataset.txt").exists()  # the root's caption would be beside it, outside it
    assert client.get("/api/folder?root=0&path=dataset").get_json()["items"][0]["caption"] is None  # not read
    r = client.post("/api/caption", json={"root": 0, "path": "dataset/img_01.png", "text": "x"}, headers=OK)
    assert r.status_code == 403 and "dataset/img_01.txt is a link (to " in r.get_json()["error"]
    assert client.post("/api/new-run", json=_new_run(client) | {"root": 1}, headers=OK).status_code == 403
    models = _new_run(client)
    models["models"]["vae"] = {"root": 0, "path": "link-out/img.png"}
    assert client.post("/api/new-run", json=models, headers=OK).status_code == 403
    after = _snapshot(demo) | {f"outside/{k}": v for k, v in _snapshot(outside).items()}
    assert after == before


def test_it_binds_to_this_machine_and_warns_for_others():
    for host in LOCAL_HOSTS:
        assert "WARNING" not in launch_message([Path("/runs")], host, 7860, "abc")
    message = launch_message([Path("/runs")], "0.0.0.0", 8080, "abc")
    assert message.startswith("WARNING: --host 0.0.0.0 lets other machines reach this page")
    assert "http://0.0.0.0:8080/?token=abc" in message and "`ssh -L 8080:127.0.0.1:8080 gpu-box`" in message


def test_a_fixed_token_comes_from_the_environment_and_one_on_the_command_line_is_warned_about(tmp_path, monkeypatch,
                                                                                               capsys):
    """Another user of the machine can read every process's command line (ps, /proc/PID/cmdline), not its
    environment: WANPAIR_DASHBOARD_TOKEN sets the token; --token still does, with a warning that names the way."""
    import wanpair.dashboard.app as app_module
    from wanpair.cli import main

    served = []
    monkeypatch.setattr(app_module, "serve", lambda roots, host, port, token, allow: served.append(token))
    monkeypatch.setenv("WANPAIR_DASHBOARD_TOKEN", "from-the-environment")
    assert main(["dashboard", str(tmp_path)]) == 0
    assert served == ["from-the-environment"] and "warning" not in capsys.readouterr().err
    assert main(["dashboard", str(tmp_path), "--token", "on-the-line"]) == 0
    assert served[-1] == "on-the-line"
    assert "every user of this machine can read (ps); set it in the environment instead: WANPAIR_DASHBOARD_TOKEN" \
        in capsys.readouterr().err
    monkeypatch.delenv("WANPAIR_DASHBOARD_TOKEN")
    assert main(["dashboard", str(tmp_path)]) == 0 and served[-1] is None  # a new random one (create_app)


def test_a_second_dashboard_on_the_same_folder_is_refused(demo):
    first = create_app([demo], token=TOKEN, tick_s=3600)  # serving: it runs the queue
    with pytest.raises(WanpairError) as refused:
        create_app([demo], token=TOKEN, tick_s=3600)
    assert str(refused.value) == (f"another wanpair dashboard (pid {os.getpid()}) already serves {demo} (its queue: "
                                  f"{demo / '.wanpair-dashboard'}); open its URL, or stop it first.")
    first.config["lock"].close()  # the first one ended
    create_app([demo], token=TOKEN, tick_s=3600).config["lock"].close()


# ---------------------------------------------------------------- the queue
def _quick(title: str, folder: Path) -> Job:
    """A job that ends in a second or two: a caption job of `folder/title` (what a queue file records and
    a restarted dashboard rebuilds) whose command is `wanpair --version`."""
    job = caption_job(folder / title, folder / "captioner")
    job.argv, job.cwd = ["--version"], str(folder)
    return job


def _until(condition, seconds: float = PATIENCE_S):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def test_the_form_captions_the_missing_ones_as_a_queued_job(client, demo):
    """The new-run form's "caption the missing ones": a `wanpair caption` job in the queue (it takes the GPU
    like a training), on the captioner `wanpair download --captioner` puts under a root's models/ folder."""
    from wanpair.demo import TINY_CAPTIONER, make_captioner
    from wanpair.setup.download import CAPTIONER_DIR

    ask = {"root": 0, "path": "dataset", "trigger": " sks shape "}
    refused = client.post("/api/caption-job", json=ask, headers=OK)
    assert refused.status_code == 400 and "wanpair download --captioner" in refused.get_json()["error"]
    make_captioner(demo / "models" / CAPTIONER_DIR, **TINY_CAPTIONER)
    for name in ("img_01.txt", "img_02.txt"):
        (demo / "dataset" / name).unlink()
    kept = (demo / "dataset" / "img_03.txt").read_text()
    job = client.post("/api/caption-job", json=ask, headers=OK).get_json()
    assert job["argv"] == ["caption", str(demo / "dataset"), "--captioner", str(demo / "models" / CAPTIONER_DIR),
                           "--trigger=sks shape"]
    queue = client.application.config["jobs"]
    _until(lambda: queue.tick() or queue.get(job["id"]).state not in ("queued", "running"))
    assert queue.get(job["id"]).state == "finished", queue.log_tail(queue.get(job["id"]))
    for name in ("img_01.txt", "img_02.txt"):
        assert (demo / "dataset" / name).read_text().startswith("sks shape, ")
    assert (demo / "dataset" / "img_03.txt").read_text() == kept  # a caption that was there is never replaced


def test_a_trigger_that_starts_with_a_dash_stays_the_trigger(tmp_path):
    assert caption_job(tmp_path / "set", tmp_path / "captioner", "-sks").argv[-1] == "--trigger=-sks"


def test_a_job_stopped_twice_gets_one_ctrl_c(tmp_path, monkeypatch):
    """A second Ctrl-C means "stop at once, without saving": a second Stop while the first saves sends nothing."""
    import wanpair.dashboard.jobs as J

    queue = JobQueue(tmp_path / "q", Roots.of([tmp_path]), busy=lambda: [])
    job = queue.add(_quick("first", tmp_path))
    sent = []
    monkeypatch.setattr(J.os, "killpg", lambda pid, sig: sent.append((pid, sig)))
    assert queue.stop(job.id).state == "stopping" and queue.stop(job.id).state == "stopping"
    assert sent == [(job.pid, J.signal.SIGINT)]


def test_a_job_that_cannot_start_fails_with_the_reason_and_the_queue_goes_on(tmp_path):
    queue = JobQueue(tmp_path / "q", Roots.of([tmp_path]), busy=lambda: [])
    gone = queue.add(_quick("gone", tmp_path / "deleted"))
    after = queue.add(_quick("after", tmp_path))
    assert gone.state == "failed" and gone.reason.startswith(f"could not start in {tmp_path / 'deleted'}: ")
    _until(lambda: queue.tick() or after.state == "finished")


def test_the_queue_persists_and_starts_the_next_job_when_one_ends(tmp_path):
    queue = JobQueue(tmp_path / "q", Roots.of([tmp_path]), busy=lambda: [])
    first = queue.add(_quick("first", tmp_path))
    second = queue.add(_quick("second", tmp_path))
    assert (first.state, second.state) == ("running", "queued")  # one at a time
    saved = json.loads((tmp_path / "q" / "queue.json").read_text())["jobs"]
    assert [(j["title"], j["state"]) for j in saved] == [("caption first", "running"), ("caption second", "queued")]
    _until(lambda: queue.tick() or second.state == "running")
    assert first.state == "finished" and first.returncode == 0
    assert queue.log_tail(first)[-1].startswith("wanpair ")  # its output went to its log
    _until(lambda: queue.tick() or second.state == "finished")
    third = queue.add(_quick("third", tmp_path / "deleted"))
    queue.jobs.append(_quick("fourth", tmp_path))  # queued behind it when the dashboard went away
    queue._save()
    reloaded = JobQueue(tmp_path / "q", Roots.of([tmp_path]), busy=lambda: [])
    assert [(j.title, j.state) for j in reloaded.jobs] == [("caption first", "finished"), ("caption second", "finished"),
                                                          ("caption third", "failed"), ("caption fourth", "held")]
    reloaded.tick()
    assert reloaded.jobs[-1].state == "held"  # it waits for a click: a restart starts nothing by itself
    assert reloaded.jobs[-1].argv[0] == "caption"  # rebuilt from what it acts on, not from the file's command


def test_a_stop_in_a_jobs_first_seconds_ends_it_as_stopped_without_a_traceback(demo):
    """Stopped while `wanpair train` still imports torch (before any training code runs): the job is
    "stopped", not "failed", and its log says so in a word instead of a KeyboardInterrupt traceback."""
    queue = JobQueue(demo / "q", Roots.of([demo]), busy=lambda: [])
    job = queue.add(train_job(demo / "wanpair.toml"))
    _until(lambda: b"torch" in Path(f"/proc/{job.pid}/maps").read_bytes())  # inside its imports
    queue.stop(job.id)
    _until(lambda: queue.tick() or job.state not in ACTIVE)
    assert job.state == "stopped" and job.returncode == 130
    assert queue.log_tail(job)[-1] == "interrupted" and not any("Traceback" in line for line in queue.log_tail(job, 200))


def _restarted(queue_folder: Path, roots: list[Path], jobs: list[Job], busy=lambda: []) -> JobQueue:
    """A dashboard restarted over a queue file that recorded `jobs` as an earlier one left them."""
    from dataclasses import asdict

    queue_folder.mkdir(exist_ok=True)
    (queue_folder / "queue.json").write_text(json.dumps({"jobs": [asdict(j) for j in jobs]}))
    return JobQueue(queue_folder, Roots.of(roots), busy=busy)


def _running(job: Job, pid: int | None = None) -> Job:
    job.state, job.pid, job.pid_started = "running", pid, process_start(pid)
    return job


def _sleeping_as(job: Job) -> subprocess.Popen:
    """A process whose command line is the job's own (`... -m wanpair.cli ARGV`), as the queue starts it; it
    sleeps until killed and exits like `wanpair train` stopped by Ctrl-C."""
    code = ("import signal, sys, time; signal.signal(signal.SIGINT, lambda *_: sys.exit(130)); print('ready', "
            "flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, "-m", "wanpair.cli", *job.argv], start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_after_a_restart_a_job_still_training_is_not_started_again_and_the_queue_waits(demo):
    """The dashboard died with two trainings marked running: one lives on (it holds its run lock), the other
    is gone. The first is shown running (not owned) and nothing starts beside it; the other, interrupted."""
    other = demo / "other.toml"
    other.write_text((demo / "wanpair.toml").read_text().replace('name = "demo_shapes_v1"', 'name = "other"'))
    mine, gone = train_job(demo / "wanpair.toml"), train_job(other)
    locks = []
    with run_lock(Path(mine.lock).parent, "demo_shapes_v1"):
        locks.append(Path(mine.lock))
        after = _restarted(demo / "q", [demo], [_running(mine, os.getpid()), _running(gone, 2**22 + 1)],
                           busy=lambda: locks)
        assert [(j.title, j.state) for j in after.jobs] == [("train demo_shapes_v1", "running"), ("train other", "interrupted")]
        assert not after.owned(after.jobs[0])
        waiting = after.add(_quick("next", demo))
        after.tick()
        assert waiting.state == "queued" and after.jobs[0].state == "running"  # the queue waits for it
        locks.clear()
    _until(lambda: after.tick() or waiting.state == "finished")
    assert after.jobs[0].state in ("interrupted", "finished")  # it ended unseen: the run's files tell how


def test_a_training_whose_workers_still_hold_its_lock_after_its_process_ended_keeps_the_queue_waiting(demo):
    """`wanpair train` stopped by Ctrl-C ends while its expert workers still save under its run lock: the job stays
    running until the lock is free, and nothing starts beside it -- even where the roots' walk cannot see the run
    (an output_dir outside them: `busy` sees nothing here). The lock is held by this test, the workers' stand-in.
    A job refused because another run holds the lock is not kept running by that run's lock."""
    job = train_job(demo / "wanpair.toml")
    job.argv = ["--version"]  # its main process: ends at once
    queue = JobQueue(demo / "q", Roots.of([demo]), busy=lambda: [])
    with run_lock(Path(job.lock).parent, "demo_shapes_v1"):
        refused = queue.add(train_job(demo / "wanpair.toml"))  # `wanpair train` while another run holds its lock
        assert queue._procs[refused.id].wait(PATIENCE_S) == 2
        queue.tick()
        assert refused.state == "failed"  # not kept running by the other run's lock
        assert "another wanpair run" in "\n".join(queue.log_tail(refused, 20))
        queue.add(job)
        Path(job.lock).write_text(str(job.pid))  # the run's own pid first, as `run_lock` writes it
        waiting = queue.add(_quick("next", demo))
        assert queue._procs[job.id].wait(PATIENCE_S) == 0
        queue.tick()
        assert (job.state, waiting.state) == ("running", "queued")
    _until(lambda: queue.tick() or waiting.state == "finished")
    assert job.state == "finished" and job.returncode == 0


def test_a_training_restarted_before_it_takes_its_lock_is_followed_by_its_process(demo):
    """A dashboard (re)started in the seconds before `wanpair train` takes its run lock: the job lives while
    its process (pid, start time, its own command line) lives, nothing starts beside it, and the new
    dashboard can stop it; it ends as stopped. A pid that now runs something else is not it."""
    job = train_job(demo / "wanpair.toml")
    proc = _sleeping_as(job)
    try:
        impostor = _running(train_job(demo / "wanpair.toml"), os.getpid())  # a live pid, but pytest's command
        after = _restarted(demo / "q", [demo], [_running(job, proc.pid), impostor])
        assert [j.state for j in after.jobs] == ["running", "interrupted"]
        waiting = after.add(_quick("next", demo))
        after.tick()
        assert waiting.state == "queued"  # one training at a time, even before it holds its lock
        assert after.stop(after.jobs[0].id).state == "stopping"
        assert proc.wait(10) == 130
        _until(lambda: after.tick() or after.jobs[0].state not in ACTIVE)
        assert after.jobs[0].state == "stopped"
    finally:
        proc.kill()


def test_after_a_restart_a_caption_job_is_followed_by_its_process_and_can_be_stopped(demo, tmp_path):
    """A caption job holds no run lock: the process with its pid, start time and command line is it (pids are
    reused); a restarted dashboard shows it running, waits for it, and stops it."""
    job = caption_job(demo / "dataset", demo / "captioner")
    proc = _sleeping_as(job)
    try:
        old = _running(caption_job(demo / "dataset", demo / "captioner"), proc.pid)
        old.pid_started -= 1  # the pid now names another process
        after = _restarted(demo / "q", [demo], [_running(job, proc.pid), old])
        assert [(j.title, j.state) for j in after.jobs] == [("caption dataset", "running"), ("caption dataset", "interrupted")]
        waiting = after.add(_quick("next", demo))
        after.tick()
        assert waiting.state == "queued" and not after.owned(after.jobs[0])  # the queue waits for it
        after.stop(after.jobs[0].id)
        assert proc.wait(10) == 130
    finally:
        proc.kill()


# ---------------------------------------------------------------- the whole flow, in a browser
def test_a_run_is_made_started_stopped_continued_and_a_queued_one_follows_in_the_browser(demo):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    app = create_app([demo], token=TOKEN, tick_s=0.3)
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/?token={TOKEN}"
    browser = _browser()
    find = browser.find_element

    def job_rows(b):
        return [(r.get_attribute("data-job"), r.text) for r in b.find_elements(By.CSS_SELECTOR, "#jobs tbody tr[data-job]")]

    def job_state(b, title: str) -> str:
        return next((text for _, text in job_rows(b) if text.startswith(title + " ")), "")

    def make(name: str, epochs: int) -> None:
        find(By.ID, "nr-name").clear()
        find(By.ID, "nr-name").send_keys(name)
        find(By.ID, "nr-epochs").clear()
        find(By.ID, "nr-epochs").send_keys(str(epochs))
        find(By.ID, "nr-preview").click()
        _wait(browser, lambda b: f"epochs = {epochs}  # recipe: 100" in b.find_element(By.ID, "nr-project-toml").text)
        find(By.ID, "nr-create").click()
        _wait(browser, lambda b: f"(run '{name}')" in b.find_element(By.ID, "nr-plan").text)  # the doctor's, first
        find(By.ID, "nr-start").click()

    try:
        browser.get(url)
        find(By.CSS_SELECTOR, "#new-run summary").click()
        folder = _wait(browser, lambda b: [o for o in b.find_elements(By.CSS_SELECTOR, "#nr-folder option")
                                           if "dataset (18 items" in o.text])[0]
        Select(find(By.ID, "nr-folder")).select_by_visible_text(folder.text)
        _wait(browser, lambda b: "18 items, 0 errors" in b.find_element(By.ID, "nr-check").text)  # the check report
        assert len(browser.find_elements(By.CSS_SELECTOR, "#nr-captions figure img")) == 18
        chosen = {s.get_attribute("data-model"): Select(s).first_selected_option.text
                  for s in browser.find_elements(By.CSS_SELECTOR, "#nr-models select")}
        assert chosen["vae"].startswith("models/wan_2.1_vae_tiny") and chosen["t5"].startswith("models/models_t5")
        find(By.ID, "nr-validate_every_n_steps").send_keys("0")
        find(By.ID, "nr-learning_rate").send_keys("0.002")
        make("flow_a", 6)
        _wait(browser, lambda b: "running" in job_state(b, "train flow_a"))
        plan = find(By.ID, "nr-plan").text
        assert "no GPU: training runs on the CPU" in plan and "no other training" in plan
        # progress appears: the job's ETA, then the run's steps in its own view
        _wait(browser, lambda b: job_state(b, "train flow_a").split("running")[1].strip()[:1].isdigit())
        next(r for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr[data-job]")
             if r.text.startswith("train flow_a")).click()
        _wait(browser, lambda b: " of 108 steps" in b.find_element(By.ID, "progress-high").text)
        _wait(browser, lambda b: "training the high-noise expert" in b.find_element(By.ID, "run-log").text)
        browser.find_element(By.CSS_SELECTOR, "#jobs tbody tr[data-job] button.job-stop").click()
        _wait(browser, lambda b: "stopped" in job_state(b, "train flow_a"))
        run_dir = demo / "output" / "flow_a"
        assert list((run_dir / "state").glob("*.pt")) and list(demo.glob("output/*flow_a-partial-step*.safetensors"))
        browser.find_element(By.CSS_SELECTOR, "#jobs tbody tr[data-job] button.job-continue").click()
        _wait(browser, lambda b: "running" in job_state(b, "continue train flow_a"))
        make("flow_b", 1)  # queued behind the run that trains now, which its plan says
        assert "measured while flow_a trains: this run waits in the queue" in find(By.ID, "nr-plan").text
        _wait(browser, lambda b: "queued" in job_state(b, "train flow_b"))
        if SHOTS:
            SHOTS.mkdir(parents=True, exist_ok=True)
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(str(SHOTS / "dashboard-queue.png"))
        _wait(browser, lambda b: "finished" in job_state(b, "continue train flow_a"))
        _wait(browser, lambda b: "finished" in job_state(b, "train flow_b"))  # it started by itself
        assert "--resume" not in " ".join(app.config["jobs"].jobs[1].argv)  # the same command continued it
        # the finished pair is listed, to download
        browser.get(url)
        row = _wait(browser, lambda b: [r for r in b.find_elements(By.CSS_SELECTOR, "#runs tbody tr[data-run]")
                                        if r.text.startswith("flow_a ")])[0]
        assert "finished" in row.text
        row.click()
        links = _wait(browser, lambda b: [a for a in b.find_elements(By.CSS_SELECTOR, "#loras tbody a")
                                          if "partial" not in a.text])
        assert sorted(a.text for a in links) == ["WAN2.2-HighNoise_flow_a.safetensors", "WAN2.2-LowNoise_flow_a.safetensors"]
        with app.test_client() as c:
            got = c.get(links[0].get_attribute("href").split(str(srv.server_port), 1)[1])
            assert got.status_code == 200 and got.data == (demo / "output" / links[0].text).read_bytes()
    finally:
        browser.quit()
        srv.shutdown()
        queue = app.config["jobs"]
        for job in list(queue.jobs):  # nothing left to start or running after a failure
            if job.state == "queued":
                queue.stop(job.id)
        for job in queue.jobs:
            if job.state in ("running", "stopping") and job.pid:
                with contextlib.suppress(ProcessLookupError):  # it ended already
                    os.killpg(job.pid, 9)
