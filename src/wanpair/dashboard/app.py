"""`wanpair dashboard`: a local, read-only web page over LoRA-pair runs (Flask; charts by Plotly).

Every asset comes from this package or from the `plotly` package (its bundled plotly.min.js), so the
page works offline. It binds to 127.0.0.1 unless told otherwise, and serves no file outside a run
folder (`runs.safe_file`). The page polls `/api/.../metrics?offset=&file=` for lines appended since its
last read, so a running training's charts grow without a reload; after a resume rewrote the file, the
answer says `reset` and the page draws the charts again from the rows it gets.
"""

from __future__ import annotations

import functools
from pathlib import Path

from flask import Flask, Response, abort, jsonify, render_template, request, send_file

from . import runs as R


def create_app(roots: list[Path]) -> Flask:
    app = Flask(__name__)
    roots = [Path(r).resolve() for r in roots]

    def run_by_id(run_id: str) -> R.Run:
        run = next((r for r in R.find_runs(roots) if r.id == run_id), None)
        if run is None:
            abort(404)
        return run

    @app.get("/")
    def index():
        return render_template("index.html", roots=[str(r) for r in roots])

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
        return jsonify(R.summary_of(run) | {"samples": R.samples_of(run), "loras": R.loras_of(run),
                                             "project": R.project_of(run)})

    @app.get("/api/runs/<run_id>/metrics")
    def api_metrics(run_id):
        return jsonify(R.rows_since(run_by_id(run_id).metrics, request.args.get("offset", 0, type=int),
                                    request.args.get("file", "")))

    @app.get("/files/<run_id>/<path:rel>")
    def files(run_id, rel):
        path = R.safe_file(run_by_id(run_id), rel)
        if path is None:
            abort(404)
        return send_file(path, conditional=True)

    return app


@functools.lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def serve(roots: list[Path], host: str, port: int) -> None:
    import logging

    from werkzeug.serving import run_simple

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request: the page polls every 2 s
    print(f"wanpair dashboard: http://{host}:{port}/  (runs under {', '.join(str(r) for r in roots)}; Ctrl-C stops)")
    run_simple(host, port, create_app(roots), threaded=True)
