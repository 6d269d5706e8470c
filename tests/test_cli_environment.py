"""What every `wanpair` command sets up before it works: light start-up, where compiled kernels are kept,
and telling a finished process from a running one."""

from __future__ import annotations

import os
import subprocess
import sys
import time

# importing wanpair.cli in this process set it: the children must decide for themselves
CLEAN = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME")}


def _python(code: str, **env) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**CLEAN, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_reading_a_lora_does_not_import_diffusers_model_code(trained):
    """`wanpair inspect` / `export` of a Musubi file start without diffusers (seconds at every command):
    the package's loaders are imported when first used."""
    lora = trained / "output" / "WAN2.2-HighNoise_demo_shapes_v1.safetensors"
    out = _python("import sys\nfrom wanpair.cli import main\n"
                  f"assert main(['inspect', {str(lora)!r}]) == 0\n"
                  "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')))")
    assert out.endswith("[]")


def test_compiled_kernels_are_kept_under_the_users_cache_unless_told_otherwise(tmp_path):
    code = "import os, wanpair.cli; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    assert _python(code, HOME=str(tmp_path)) == str(tmp_path / ".cache" / "wanpair" / "torch-compile")
    assert _python(code, XDG_CACHE_HOME=str(tmp_path / "xdg")) == str(tmp_path / "xdg" / "wanpair" / "torch-compile")
    assert _python(code, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine")) == str(tmp_path / "mine")


def test_a_killed_process_not_yet_reaped_is_not_running():
    """A run's lock names processes; one killed but not yet reaped by its parent (a zombie) must not keep
    the run 'running' forever."""
    from wanpair.train.run_lock import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)
        child.kill()
        deadline = time.time() + 10
        while pid_alive(child.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child.pid)  # a zombie now: it still exists, but does not run
    finally:
        child.wait()
    assert not pid_alive(child.pid)


def test_a_reader_that_stops_reading_ends_the_command_quietly(monkeypatch, capsys):
    """`wanpair doctor | head -3`: the pipe closed under the output is no error to report."""
    import sys

    from wanpair.cli import main

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("wanpair.cli.cmd_doctor", closed)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # the handler points stdout at /dev/null: given back after
    assert main(["doctor"]) == 1
    assert capsys.readouterr().err == ""
