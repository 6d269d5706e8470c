"""`wanpair dashboard`: a local web page that makes, runs and watches LoRA-pair runs (Flask; charts by Plotly).

Every asset comes from this package or from the `plotly` package (its bundled plotly.min.js), so the
page works offline. The page polls `/api/.../metrics?offset=&file=` for lines appended since its last
read, so a running training's charts grow without a reload; after a resume rewrote the file, the answer
says `reset` and the page draws the charts again from the rows it gets.

Because the page can start processes and write files, it follows Jupyter's safety model (docs/dashboard.md
has the threat model):
- it binds to 127.0.0.1 unless told otherwise, and answers only requests whose `Host` is a name of this
  machine (localhost, an IP address) or one the user allowed (`--allow-host`): a hostile web page that
  rebinds its own name to 127.0.0.1 (DNS rebinding) is refused;
- a random token made at launch is printed in the URL. Every request but the page's own code must carry it:
  a read in the `X-Wanpair-Token` header or the `token` query parameter (images, videos, downloads), a
  request that writes or starts (a POST; nothing else changes anything) in the header only, never a cookie,
  so another site cannot make a browser send it (no CSRF), and from the page's own origin when it says one;
- bodies are limited (MAX_BODY); paths come from the page as (root, relative path), are checked by
  `paths.Roots`, and every file is opened, served and written through `paths` (checked on the descriptor).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hmac
import ipaddress
import os
import re
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, Response, abort, jsonify, render_template, request, send_file
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import WanpairError
from ..models.tasks import TASKS
from . import runs as R
from .jobs import ACTIVE, JobQueue, caption_job, open_own, the_users_own, train_job
from .new_run import (NeedsConfirmation, NewRun, captioner_in, captions, check_report, dataset_folders,
                      model_choices, recipe_settings, write_caption, FORM_EXPERT_SETTINGS)
from .paths import PathRefused, Roots
from .plan import Doctor

TOKEN_HEADER = "X-Wanpair-Token"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
QUEUE_FOLDER = ".wanpair-dashboard"  # in the first root: the queue, the jobs' logs and the dashboard's lock
MAX_BODY = 2 * 2**20  # bytes: the largest request is a new run's form or a caption, a few KB
OPEN_ENDPOINTS = ("static", "plotly_js")  # the page's own code: the same for everyone, nothing private


def allowed_hosts(bind_host: str, allow: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The host names requests may name: this machine's, the one it listens on, and those the user added."""
    names = {*LOCAL_HOSTS, *(h.lower() for h in allow)}
    if bind_host not in WILDCARD_HOSTS:
        names.add(bind_host.strip("[]").lower())
    return frozenset(names)


HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?")  # a name or an address, and a port


def _netloc(url: str) -> str | None:
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:
        return None


def host_is_allowed(host_header: str, allowed: frozenset[str]) -> bool:
    """Is `Host` one of `allowed` (any port: an ssh tunnel may use another), or an IP address? A page can make
    a browser send its own name with our address only by DNS rebinding; an address literal cannot be
    rebound. `*` in `allowed` lets any name through (behind a proxy that checks names itself)."""
    if not HOST.fullmatch(host_header):  # no user info, path, fragment or white space: what browsers send
        return False
    try:
        name = urlsplit("//" + host_header).hostname
    except ValueError:
        return False
    if not name:
        return False
    if name in allowed or "*" in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def create_app(roots: list[Path], token: str | None = None, tick_s: float | None = 1.0, host: str = "127.0.0.1",
               allow_hosts: list[str] | tuple[str, ...] = ()) -> Flask:
    """The app over `roots`; `token`: what requests must carry (default: a new random one, in app.config);
    `tick_s`: how often the queue looks at its jobs (None: only when asked, for tests); `host`: the address
    it listens on, and `allow_hosts`: more names it answers to (`--allow-host`)."""
    app = Flask(__name__)
    app.json.sort_keys = False  # [models] keys in the project's order
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY  # werkzeug refuses a larger body, chunked or not (413)
    where = Roots.of(roots)
    roots = list(where.paths)
    app.config["token"] = token = token or secrets.token_urlsafe(24)
    hosts = allowed_hosts(host, allow_hosts)
    if tick_s:  # a serving dashboard: the only one that runs this queue
        app.config["lock"] = _only_dashboard_of(roots[0] / QUEUE_FOLDER)
    jobs = JobQueue(roots[0] / QUEUE_FOLDER, where, lambda: R.training_now(roots))
    app.config["jobs"] = jobs
    doctor = Doctor()
    if tick_s:
        jobs.run_forever(tick_s)

    def token_is(given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())

    @app.before_request
    def only_this_machine_and_the_token():
        if not host_is_allowed(request.environ.get("HTTP_HOST", ""), hosts):
            return _refused(f"refused: this dashboard answers only to {', '.join(sorted(hosts))} and IP addresses "
                            f"(the request named {request.environ.get('HTTP_HOST', 'no host')!r}). Reached through "
                            "another name? Start it with --allow-host NAME.", 403)
        if request.endpoint in OPEN_ENDPOINTS:
            return None
        if request.method in ("GET", "HEAD"):
            if token_is(request.headers.get(TOKEN_HEADER) or request.args.get("token", "")):
                return None
            return _refused("refused: this page shows your datasets and runs only with the dashboard's token. "
                            "Open the URL `wanpair dashboard` printed (it ends in ?token=...).", 403)
        given = request.headers.get(TOKEN_HEADER, "")
        if not token_is(given):
            what = "without the dashboard's token" if not given else "with a wrong token"
            return _refused(f"refused: a request that writes or starts was sent {what}. Open the URL "
                            "`wanpair dashboard` printed (it ends in ?token=...).", 403)
        origin = request.headers.get("Origin")
        if origin is not None and _netloc(origin) != request.environ["HTTP_HOST"].lower():
            return _refused(f"refused: a request that writes or starts came from another site ({origin}).", 403)
        return None

    @app.after_request
    def no_sniffing_framing_or_referrers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        response.headers.setdefault("Referrer-Policy", "no-referrer")  # the token is in URLs of images
        return response

    @app.errorhandler(WanpairError)
    def refused(e: WanpairError):
        status = 403 if isinstance(e, PathRefused) else 409 if isinstance(e, NeedsConfirmation) else 400
        return jsonify(error=str(e), confirm=isinstance(e, NeedsConfirmation)), status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_):
        return jsonify(error=f"refused: the request is larger than {MAX_BODY // 2**20} MB; the dashboard's "
                             "requests are a form or a caption."), 413

    @app.errorhandler(UnicodeError)
    def not_text(e: UnicodeError):  # a lone surrogate in a path or a caption
        return jsonify(error=f"refused: the request holds text that is not valid Unicode ({e.reason})."), 400

    @app.errorhandler(OSError)
    def file_system_said_no(e: OSError):  # a name too long, a file gone meanwhile: said, not a 500
        gone = isinstance(e, (FileNotFoundError, NotADirectoryError))
        return jsonify(error=f"refused: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")), 404 if gone else 400

    def body() -> dict:
        try:
            data = request.get_json(silent=True)
        except RecursionError:  # nested deeper than a form or a caption ever is
            data = None
        if not isinstance(data, dict):
            raise WanpairError("the request must be a JSON object.")
        return data

    def job_view(job) -> dict:
        run = R.Run(Path(job.run_dir)) if job.run_dir and where.locate(Path(job.run_dir)) else None
        progress = R.summary_of(run) if run and run.metrics.exists() else None
        return dataclasses.asdict(job) | {"owned": jobs.owned(job), "tail": jobs.log_tail(job, 12),
                                          "run": progress and progress["id"], "eta_s": progress and progress["eta_s"],
                                          "project_at": where.locate(Path(job.project)) if job.project else None}

    def run_by_id(run_id: str) -> R.Run:
        run = next((r for r in R.find_runs(roots) if r.id == run_id), None)
        if run is None:
            abort(404)
        return run

    @app.get("/")
    def index():
        return render_template("index.html", roots=[str(r) for r in roots], settings=recipe_settings(),
                               expert_settings=FORM_EXPERT_SETTINGS, tasks=list(TASKS))

    def send_opened(f, name: str, attachment: bool = False) -> Response:
        """A file opened through `paths` (checked on its descriptor), with ranges (video seeking) and caching."""
        st = os.fstat(f.fileno())
        response = send_file(f, download_name=name, as_attachment=attachment, conditional=False, etag=False,
                             last_modified=st.st_mtime)
        response.content_length = st.st_size
        response.set_etag(f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}")
        return response.make_conditional(request.environ, accept_ranges=True, complete_length=st.st_size)

    @app.get("/static/plotly.min.js")
    def plotly_js():
        return Response(_plotly_js(), mimetype="application/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/api/runs")
    def api_runs():
        return jsonify([R.summary_of(r) for r in R.find_runs(roots)])

    @app.get("/api/runs/<run_id>")
    def api_run(run_id):
        run = run_by_id(run_id)
        job = next((j for j in reversed(jobs.jobs) if j.run_dir == str(run.run_dir)), None)
        return jsonify(R.summary_of(run) | {"samples": R.samples_of(run), "loras": R.loras_of(run),
                                             "project": R.project_of(run) or (job and job.project),
                                             "job": job and job.id, "log": jobs.log_tail(job, 30) if job else []})

    @app.get("/api/runs/<run_id>/lora/<name>")
    def lora_file(run_id, name):
        f = R.open_lora(run_by_id(run_id), name)
        if f is None:
            abort(404)
        return send_opened(f, name, attachment=True)

    @app.get("/api/runs/<run_id>/metrics")
    def api_metrics(run_id):
        return jsonify(R.rows_since(run_by_id(run_id), request.args.get("offset", 0, type=int),
                                    request.args.get("file", "")))

    @app.get("/files/<run_id>/<path:rel>")
    def files(run_id, rel):
        f = R.open_run_file(run_by_id(run_id), rel)
        if f is None:
            abort(404)
        return send_opened(f, Path(rel).name)

    # ------------------------------------------------------------ a new run
    @app.get("/api/folders")
    def api_folders():
        return jsonify(roots=[str(r) for r in roots], folders=dataset_folders(where))

    @app.get("/api/folder")
    def api_folder():
        folder = where.resolve(request.args.get("root", type=int), request.args.get("path", ""))
        report = check_report(folder, request.args.get("force") == "true", where, request.args.get("task", ""))
        return jsonify(items=captions(folder, where), report=report.render(), errors=report.errors,
                       warnings=report.warnings)

    @app.get("/media")
    def media():
        path = where.resolve(request.args.get("root", type=int), request.args.get("path", ""))
        if path.suffix.lower() not in R.MEDIA or not path.is_file():
            abort(404)
        return send_opened(where.open(path), path.name)

    @app.get("/api/models")
    def api_models():
        return jsonify(model_choices(where, request.args.get("task", "")))

    @app.post("/api/caption")
    def api_caption():
        data = body()
        cap = write_caption(where.resolve(data.get("root"), data.get("path")), str(data.get("text", "")), where)
        return jsonify(written=where.locate(cap))

    @app.post("/api/caption-job")
    def api_caption_job():
        data = body()
        folder = where.resolve(data.get("root"), data.get("path"))
        if not folder.is_dir():
            raise WanpairError(f"{folder} is not a folder of images or clips.")
        return jsonify(job_view(jobs.add(caption_job(folder, captioner_in(where), str(data.get("trigger", "")).strip()))))

    @app.post("/api/new-run/preview")
    def api_preview():
        data = body()
        new = NewRun.from_request(data, where)
        plan = new.plan(recipe_dataset=data.get("recipe_dataset") is True)
        return jsonify(project=where.locate(plan.project), project_toml=plan.project_text,
                       dataset=where.locate(plan.dataset), dataset_toml=plan.dataset_text,
                       existing=[str(p) for p in new.existing(plan)], problems=new.problems(plan), notes=plan.notes)

    @app.post("/api/new-run")
    def api_new_run():
        data = body()
        plan, done = NewRun.from_request(data, where).create(recipe_dataset=data.get("recipe_dataset") is True,
                                                             replace=data.get("replace") is True)
        return jsonify(project=where.locate(plan.project), done=done)

    @app.post("/api/plan")
    def api_plan():
        """`wanpair doctor PROJECT` (`plan.Doctor`: its own process, one at a time). A POST: it starts a process.
        While another run trains, its memory plan is measured beside that run and may fail; the run then waits
        in the queue, so the verdict does not stop it being queued."""
        data = body()
        project = where.resolve(data.get("root"), data.get("path"))
        if not project.is_file():
            raise WanpairError(f"{project} is not a project file.")
        verdict = doctor.ask(project)
        busy = {Path(j.lock) for j in jobs.jobs if j.lock and j.state in ACTIVE} | set(R.training_now(roots))
        training = ", ".join(sorted(l.name[1:-5] for l in busy))
        lines = (verdict.stdout + verdict.stderr).rstrip().splitlines() + [
            f"· this plan was measured while {training} trains: this run waits in the queue and starts when it "
            "ends (one training at a time on this machine)" if busy else "· no other training under these folders now"]
        return jsonify(ok=verdict.returncode == 0 or bool(busy), lines=lines)

    # ------------------------------------------------------------ the queue
    @app.get("/api/jobs")
    def api_jobs():
        return jsonify([job_view(j) for j in reversed(jobs.jobs)])

    @app.get("/api/jobs/<job_id>/log")
    def api_job_log(job_id):
        return jsonify(lines=jobs.log_tail(jobs.get(job_id), request.args.get("lines", 200, type=int)))

    @app.post("/api/jobs")
    def api_add_job():
        data = body()
        project = where.resolve(data.get("root"), data.get("path"))
        return jsonify(job_view(jobs.add(train_job(project, overwrite=data.get("overwrite") is True))))

    @app.post("/api/jobs/<job_id>/stop")
    def api_stop(job_id):
        return jsonify(job_view(jobs.stop(job_id)))

    @app.post("/api/jobs/<job_id>/continue")
    def api_continue(job_id):
        return jsonify(job_view(jobs.again(job_id)))

    @app.post("/api/jobs/<job_id>/queue")
    def api_release(job_id):
        return jsonify(job_view(jobs.release(job_id)))

    return app


@functools.lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _refused(message: str, status: int) -> Response:
    """A refusal: JSON for the page's requests, a line of text for a person who opened a URL."""
    if request.path.startswith("/api/"):
        return jsonify(error=message), status
    return Response(message + "\n", status, mimetype="text/plain")


def _only_dashboard_of(folder: Path):
    """The dashboard's lock on `folder` (its queue), held for its lifetime: two dashboards on one queue would
    both start its jobs. A flock, so a dashboard that died holds nothing."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # the queue and the logs: the user's alone
    the_users_own(folder)  # a planted link or a folder others write to: refused before anything is opened in it
    lock = os.fdopen(open_own(folder / "dashboard.lock", os.O_RDWR | os.O_CREAT), "r+")  # held while the app lives
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip()
        lock.close()
        raise WanpairError(f"another wanpair dashboard{f' (pid {pid})' if pid.isdigit() else ''} already serves "
                           f"{folder.parent} (its queue: {folder}); open its URL, or stop it first.") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def launch_message(roots: list[Path], host: str, port: int, token: str) -> str:
    """What `wanpair dashboard` prints: the URL with its token, and a warning when others can reach it."""
    shown = f"[{host}]" if ":" in host else host
    lines = [f"wanpair dashboard: http://{shown}:{port}/?token={token}",
             f"  runs under {', '.join(str(r) for r in roots)}; keep this URL to yourself: it shows your data and "
             "starts runs, and without its token the page shows nothing. Ctrl-C stops the dashboard, not the "
             "trainings it started."]
    if host not in LOCAL_HOSTS:
        lines.insert(0, f"WARNING: --host {host} lets other machines reach this page; whoever has the URL with its "
                        "token can start trainings and write files in these folders. Prefer the default 127.0.0.1 "
                        f"and `ssh -L {port}:127.0.0.1:{port} gpu-box` from your computer (docs/dashboard.md).")
    return "\n".join(lines)


def serve(roots: list[Path], host: str, port: int, token: str | None = None,
          allow_hosts: list[str] | tuple[str, ...] = ()) -> None:
    import logging

    from werkzeug.serving import run_simple

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request: the page polls every 2 s
    app = create_app(roots, token, host=host, allow_hosts=allow_hosts)
    print(launch_message(roots, host, port, app.config["token"]))
    run_simple(host, port, app, threaded=True)
