"""Rehearse every user path at full size on the GPU machine, through the real CLI.

    PYTHONPATH=src python bench/rehearsal.py WORK [--steps 24]
    PYTHONPATH=src python bench/rehearsal.py WORK --tiny     # the same paths on tiny models, CPU: a dry run

Writes full-size random inputs in the files users have -- Wan 2.2 T2V A14B experts as fp16, bf16,
plain fp8 (e4m3fn, block matrices cast without scales) and ComfyUI scaled fp8 single files and as a
diffusers folder; the Wan 2.1 VAE; the 24-layer umT5-XXL `.pth`; a tokenizer folder; 18 images in
three aspect ratios with the recipe's `dataset.toml` -- and runs `wanpair` on them as a user would:

  train (default memory mode), killed once a state is saved, then `train --resume`
  train both experts at once on one GPU, `wanpair train` killed outright, the same command again, sample
  train in fp16 beside bf16 (speed, fp8 matmuls, losses); an fp16 run with samples, killed, continued in
  `memory_mode = "low"`
  train the I2V A14B pair (36-channel experts) on video clips, sample a clip from a first frame
  sample (both experts with their LoRAs, two prompts: time to the first image and to the next)
  export to every layout, inspect
  train in `memory_mode = "low"` (bf16 high file, scaled fp8 low file)
  train from a diffusers folder (high) and an fp8 file with `fp8_base = false` (low)
  merge into an fp8 base and into an fp16 base
  train Wan 2.1 T2V 1.3B (recognised by its shapes) and Wan 2.1 T2V 14B (plain fp8): one LoRA each, sampled
Stages (`--stages`): default (train, resume, sample), pair (both experts at once on one GPU, `wanpair train` killed
outright, the same command again, sample, then the same pair one after the other for the ratio), runtime (`wanpair
doctor`'s whole-run estimate against a run of --steps per expert, stage by stage, and the recipe's estimate against
the recipe projected from that run), trust (the high-noise expert in bf16 and in fp16; then fp16 with states and
samples during training, both experts, killed after the first state, and the same command with `memory_mode = "low"`
added, which must continue it and sample with the LoRAs this run made), crash (the defaults' crash state: killed
outright after an intermediate LoRA, the same command finishes the pair; killed before any state, the same command
sets the earlier files aside and starts again), settle (fp16 whose loss scale settles: the first 3 updates skipped,
the run still ends with its data and validates at its last step), share (per-expert learning rates logged to
Trackio, read back from its store; the ComfyUI workflow), i2v (the image-to-video pair from 17-frame 832x480 clips,
then sampled from a first frame), export, low, folder, merge, wan21; each fits in one 10-minute command on an H100.
`--stages smoke` is the shortest full-size proof, for a short lease: both experts from plain fp8 files (the
layout that crashed a first run on CUDA) trained a few steps in the default memory mode, then sampled.
`--write-only` writes the inputs the stages need and stops, so that writing can overlap other work.

One line per path (ok / FAILED, seconds, peak GPU memory of the command, notes) goes to stdout and
`WORK/results.md`, ready for docs/rehearsal.md. A failed path does not stop the next unless it needs
the failed one's output. The 64 GiB disk holds at most two experts and the text encoder at a time,
so files are written just before the paths that need them and deleted after (see `STAGES`).
Weights are random: the rehearsal proves loading, memory, speed and files, not image quality.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# Wan 2.2 T2V A14B expert (the official config) and umT5-XXL encoder (Wan's T5: 24 layers, 4096 wide)
A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False)
WAN21_1_3B = dict(A14B, num_attention_heads=12, ffn_dim=8960, num_layers=30)  # Wan2.1 wan_t2v_1_3B.py
# ComfyUI's file names (Comfy-Org/Wan_2.2_ComfyUI_Repackaged); the expert is recognised from them
NAMES = {"fp16": "wan2.2_t2v_{e}_noise_14B_fp16.safetensors", "bf16": "wan2.2_t2v_{e}_noise_14B_bf16.safetensors",
         "fp8": "wan2.2_t2v_{e}_noise_14B_fp8_e4m3fn.safetensors",
         "fp8-scaled": "wan2.2_t2v_{e}_noise_14B_fp8_scaled.safetensors", "diffusers": "Wan2.2-T2V-A14B-{e}/transformer",
         "i2v-fp8": "wan2.2_i2v_{e}_noise_14B_fp8_e4m3fn.safetensors",  # the image-to-video pair: 36 input channels
         # Wan 2.1's single models (Comfy-Org/Wan_2.1_ComfyUI_repackaged): one file, expert "full"
         "w21-1.3B": "wan2.1_t2v_1.3B_fp16.safetensors", "w21-fp8": "wan2.1_t2v_14B_fp8_e4m3fn.safetensors"}
SINGLE = {"w21-1.3B", "w21-fp8"}
I2V_CLIP = (832, 480, 17)  # width, height, frames of the I2V stage's clips (the recipe's size, 17 of its 81 frames)
SEEDS = {"high": 1, "low": 2, "full": 5}
# --tiny: the same architecture at toy size on the CPU, to try the rehearsal itself before GPU time is spent
TINY = os.environ.get("REHEARSAL_TINY") == "1"
if TINY:
    A14B |= dict(num_attention_heads=1, text_dim=64, ffn_dim=256, num_layers=2)
    WAN21_1_3B = dict(A14B)
    UMT5_XXL |= dict(d_model=64, d_kv=8, d_ff=128, num_layers=2, num_heads=8)
DEVICE = "cpu" if TINY else "cuda"
FP16 = "bf16" if TINY else "fp16"  # the CLI refuses fp16 on a CPU (no loss scaler): --tiny tries `trust` in bf16


# ------------------------------------------------------------------ writers (each in its own process)
def make_expert(layout: str, expert: str, dest: Path) -> None:
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from wanpair.models.dit import to_original_name

    torch.manual_seed(SEEDS[expert])
    config = WAN21_1_3B if layout == "w21-1.3B" else A14B
    layout = {"w21-1.3B": "fp16", "w21-fp8": "fp8"}.get(layout, layout)
    torch.set_default_dtype(torch.float16 if layout == "fp16" else torch.bfloat16)
    i2v = layout.startswith("i2v-")
    layout = layout.removeprefix("i2v-")
    with torch.device(DEVICE):
        model = WanTransformer3DModel(**{**config, "in_channels": 36 if i2v else 16})
    if layout == "diffusers":
        model.to("cpu").save_pretrained(str(dest), max_shard_size="10GB")
        return
    sd = {}
    if layout == "fp8-scaled":  # ComfyUI's marker: weight = fp8 * scale_weight (a per-tensor scale)
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    for name, value in model.state_dict().items():
        key = to_original_name(name)
        if layout.startswith("fp8") and value.dim() == 2 and key.startswith("blocks."):
            if layout == "fp8-scaled":
                scale = value.float().abs().amax() / 448
                sd[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1).cpu()
                value = value.float() / scale
            value = value.to(torch.float8_e4m3fn)
        sd[key] = value.to("cpu").contiguous()
    del model
    save_file(sd, str(dest), metadata={"format": "pt"})


def make_text_encoder(dest: Path) -> None:
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from wanpair.models.text_encoder import to_wan_name

    torch.manual_seed(3)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    torch.save({to_wan_name(k): v.cpu() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"},
               str(dest))


def make_small_inputs(root: Path) -> None:
    """VAE (Wan 2.1's config), tokenizer folder, 18 images in three aspect ratios, dataset.toml."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKLWan
    from PIL import Image
    from safetensors.torch import save_file

    from wanpair.demo import make_tokenizer
    from wanpair.models.vae import to_original_name

    torch.manual_seed(4)
    vae = AutoencoderKLWan(**(dict(base_dim=8) if TINY else {}))  # diffusers' defaults are Wan 2.1's VAE
    save_file({to_original_name(k): v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()},
              str(root / "wan_2.1_vae.safetensors"))
    data = root / "dataset"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["a red fox", "a blue teapot", "a mountain lake", "an old tram", "a paper lantern", "a sleeping cat"]
    captions = []
    for i in range(18):
        w, h = [(1024, 1024), (1280, 720), (720, 1280)][i % 3]
        w, h = (w // 16, h // 16) if TINY else (w, h)
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        pixels = np.stack([np.sin(xx * rng.uniform(2, 9) + c) * np.cos(yy * rng.uniform(2, 9)) for c in range(3)], -1)
        Image.fromarray(((pixels * 0.5 + 0.5) * 255).astype(np.uint8)).save(data / f"{i:02d}.png")
        captions.append(f"zxq style, {words[i % len(words)]} in soft morning light, photo {i}")
        (data / f"{i:02d}.txt").write_text(captions[-1] + "\n")
    (data / "dataset.toml").write_text(  # the recipe's dataset.toml
        f'[general]\nresolution = [{64 if TINY else 960}, {64 if TINY else 960}]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n'
        'bucket_no_upscale = false\n\n[[datasets]]\nimage_directory = "."\ncache_directory = "cache"\nnum_repeats = 1\n')
    make_tokenizer(root / "umt5-tokenizer", captions + ["a cat", "a fox", "zxq style"])


def make_clips(root: Path) -> None:
    """18 clips (folders of PNG frames, a shape crossing a gradient) with captions, and their dataset.toml."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h, frames = I2V_CLIP
    w, h = (w // 13, h // 10) if TINY else (w, h)  # 64x48 on the CPU
    videos = root / "videos"
    videos.mkdir(exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    for i in range(18):
        (videos / f"clip_{i:02d}").mkdir(exist_ok=True)
        ground = ((np.stack([np.sin(xx * (3 + i % 5) + c) for c in range(3)], -1) * 0.5 + 0.5) * 255).astype(np.uint8)
        for f in range(frames):
            im = Image.fromarray(ground)
            x, r = w // 6 + (2 * w // 3) * f // (frames - 1), h // 6
            ImageDraw.Draw(im).ellipse((x - r, h // 2 - r, x + r, h // 2 + r), fill=(200, 40 + 10 * i, 60))
            im.save(videos / f"clip_{i:02d}" / f"{f:03d}.png")
        (videos / f"clip_{i:02d}.txt").write_text(f"zxq style, a red ball rolling to the right, clip {i}\n")
    (videos / "dataset.toml").write_text(
        f'[general]\nresolution = [{w}, {h}]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n\n'
        f'[[datasets]]\nvideo_directory = "."\ncache_directory = "cache"\ntarget_frames = [{frames}]\n')


# ------------------------------------------------------------------ running and measuring
class GpuPeak:
    """Peak GPU memory in use while a command runs, from nvidia-smi (all processes: the CLI's workers too),
    minus what was in use before it started."""

    def __init__(self):
        self.base = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _used() -> float:
        if TINY:
            return 0.0
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True).stdout
        return float(out.split()[0]) / 1024 if out.strip() else 0.0

    def _poll(self):
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self._used())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak - self.base


class Rehearsal:
    def __init__(self, work: Path, steps: int, logs: Path | None = None):
        self.work, self.steps, self.rows = work, steps, []
        self.logs = logs or work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def record(self, path: str, ok: bool, seconds: float, gib: float | None, note: str = "") -> bool:
        row = {"path": path, "ok": ok, "seconds": round(seconds, 1), "peak_gpu_gib": None if gib is None else round(gib, 1),
               "note": note}
        self.rows.append(row)
        print(f"{'ok    ' if ok else 'FAILED'} {path:<58} {seconds:7.1f} s  "
              f"{'' if gib is None else f'{gib:5.1f} GiB'}  {note}", flush=True)
        (self.work / "results.json").write_text(json.dumps(self.rows, indent=1))
        return ok

    def make(self, what: str, *args: str) -> bool:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--make", what, *args], env=self.env, capture_output=True,
                              text=True)
        (self.logs / f"make-{what}-{Path(args[-1]).name}.log").write_text(done.stdout + done.stderr)
        size = sum(f.stat().st_size for f in Path(args[-1]).rglob("*")) if Path(args[-1]).is_dir() else \
            Path(args[-1]).stat().st_size if Path(args[-1]).exists() else 0
        return self.record(f"write {what} {' '.join(args[:-1])}", done.returncode == 0, time.perf_counter() - start,
                           None, f"{size / 1e9:.1f} GB" if done.returncode == 0 else done.stderr[-300:].replace("\n", " | "))

    def cli(self, path: str, *argv: str, kill_when=None) -> tuple[bool, list[tuple[float, str]], float, float]:
        """Run `wanpair ARGV`; returns (ok, [(seconds, line)], seconds, peak GiB). `kill_when()` true: SIGKILL."""
        start = time.perf_counter()
        lines: list[tuple[float, str]] = []
        log = open(self.logs / f"{re.sub(r'[^a-z0-9]+', '-', path.lower())}.log", "w")
        with GpuPeak() as peak:
            proc = subprocess.Popen([sys.executable, "-m", "wanpair.cli", *argv], env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            killer = None
            if kill_when:
                def watch():
                    while proc.poll() is None:
                        if kill_when():
                            proc.send_signal(signal.SIGKILL)
                            return
                        time.sleep(0.2)
                killer = threading.Thread(target=watch, daemon=True)
                killer.start()
            for line in proc.stdout:
                lines.append((time.perf_counter() - start, line.rstrip()))
                log.write(f"{lines[-1][0]:8.1f} {line}")
            proc.wait()
        log.close()
        ok = proc.returncode == 0 or (kill_when is not None and proc.returncode == -signal.SIGKILL)
        return ok, lines, time.perf_counter() - start, peak.gib

    def project(self, name: str, high: str, low: str | None, train: str, dataset: str = "dataset",
                model: str = "", tables: str = "") -> Path:
        """A project over the pair `high` + `low`, or (low None) over the single model `high`; `tables`:
        more TOML tables after [train] (e.g. [sample])."""
        path = self.work / f"{name}.toml"
        dits = f'high_noise = "{high}"\nlow_noise = "{low}"\n' if low else f'dit = "{high}"\n'
        path.write_text(
            f'name = "rehearsal_{name}"\noutput_dir = "out-{name}"\n{f"model = {model!r}" if model else ""}\n\n'
            f'[models]\n{dits}vae = "wan_2.1_vae.safetensors"\n'
            f't5 = "models_t5_umt5-xxl-enc-bf16.pth"\ntokenizer = "umt5-tokenizer"\n\n'
            f'[dataset]\nconfig = "{dataset}/dataset.toml"\n\n[train]\n{train}{tables}')
        return path

    def train(self, path: str, project: Path, *extra: str, kill_when=None, expect: tuple[str, ...] = ()) -> bool:
        """`wanpair train PROJECT EXTRA`; `expect`: patterns its output must show (what they match leads the note)."""
        ok, lines, seconds, gib = self.cli(path, "train", str(project), *extra, kill_when=kill_when)
        text = "\n".join(line for _, line in lines)
        note = "" if ok else _error(lines)
        if ok and kill_when is None:
            note = training_note(text, project)
        elif ok:
            note = "killed: " + ", ".join(sorted(p.name for p in state_dir(project).glob("*.pt")))
        if ok and expect:
            found = [(pattern, re.search(pattern, text)) for pattern in expect]
            ok = all(m for _, m in found)
            note = "; ".join([m.group(0) if m else f"NOT in the output: {pattern}" for pattern, m in found] + [note])
        return self.record(path, ok, seconds, gib, note)


    def orphans_saved(self, project: Path) -> bool:
        """After `wanpair train` was killed outright: its workers stop themselves, saving; how long it took."""
        from wanpair.train.run_lock import lock_holder, lock_path

        start = time.perf_counter()
        lock = lock_path(project.parent / f"out-{project.stem}", f"rehearsal_{project.stem}")
        while lock_holder(lock) and time.perf_counter() - start < 120:
            time.sleep(0.2)
        partial = sorted(p.name for p in (project.parent / f"out-{project.stem}").glob("*partial*.safetensors"))
        return self.record("its workers notice, save and stop", not lock_holder(lock) and len(partial) == 2,
                           time.perf_counter() - start, None, ", ".join(partial))


def state_dir(project: Path) -> Path:
    name = re.search(r'name = "(.+)"', project.read_text()).group(1)
    return project.parent / f"out-{project.stem}" / name / "state"


def metrics_rows(project: Path) -> list[dict]:
    metrics = state_dir(project).parent / "metrics.jsonl"
    return [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []


def median_step(rows: list[dict]) -> float:
    """Median s/step of the step rows, from step 3 on (the first compiles) when there are that many."""
    return statistics.median([r["s_per_step"] for r in rows if r["step"] >= 3] or [r["s_per_step"] for r in rows])


def training_note(text: str, project: Path) -> str:
    """Median s/step of each expert (steps 3+), the plan's estimate, the measured peak, what was loaded."""
    rows = metrics_rows(project)
    parts = []
    for expert in ("high", "low", "full"):
        ours = [r for r in rows if r.get("expert") == expert]
        runs = [i for i, r in enumerate(ours) if "total_steps" in r]  # each training process's first row
        this_run = [r for r in ours[runs[-1] if runs else 0:] if "s_per_step" in r]
        mine = [r for r in ours if "s_per_step" in r]
        if mine:
            val = [r["val_seconds"] for r in ours if "val_seconds" in r]
            first = f"first {mine[0]['s_per_step']:.1f} s" + (
                f", first of this run {this_run[0]['s_per_step']:.1f} s" if len(runs) > 1 and this_run else "")
            parts.append(f"{expert}: {len(mine)} steps, median {median_step(mine):.3f} s/step "
                         f"({first}), peak allocated "
                         f"{max(r.get('gpu_mem_gib', 0) for r in mine):.1f} GiB"
                         + (f", validation {statistics.median(val):.2f} s per evaluation" if val else ""))
    estimates = re.findall(r"estimated peak ([\d.]+) of ([\d.]+) GiB", text)
    if estimates:
        parts.append("plan: " + ", ".join(f"{a} of {b} GiB" for a, b in estimates))
    return "; ".join(parts)


def _error(lines) -> str:
    tail = [line for _, line in lines if line.strip()][-3:]
    return " | ".join(tail)[-400:]


def rm(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


STAGES = ("default", "pair", "trust", "crash", "settle", "counts", "runtime", "share", "i2v", "export", "low", "folder",
          "merge", "wan21")  # every user path
QUICK = ("smoke",)  # the short proof, chosen by name only


def rehearse(work: Path, steps: int, stages: tuple[str, ...] = STAGES, write_only: bool = False,
             logs: Path | None = None) -> list[dict]:
    """The stages in order; each writes the files it needs (unless already there) and deletes the
    experts it does not, so at most two experts and the text encoder share the disk."""
    r = Rehearsal(work, steps, logs)
    t5 = work / "models_t5_umt5-xxl-enc-bf16.pth"
    f = {(layout, e): work / NAMES[layout].format(e=e) for layout in NAMES
         for e in (("full",) if layout in SINGLE else ("high", "low"))}
    rel = {k: str(v.relative_to(work)) for k, v in f.items()}
    every = max(1, min(8, steps // 2))
    recipe = f"save_state_every_n_steps = {every}\nkeep_states = 2\nvalidate_every_n_steps = 8\nmax_steps = {steps}\n"

    def need(*files: tuple[str, str]) -> bool:
        """Delete the other experts, write these (and the small inputs and text encoder) if missing."""
        for key, path in f.items():
            if key not in files:
                rm(path.parent if key[0] == "diffusers" else path)
        ok = (work / "dataset").is_dir() or r.make("small", str(work))
        ok = (t5.exists() or r.make("t5", str(t5))) and ok
        for layout, e in files:
            if layout == "diffusers":
                f[layout, e].parent.mkdir(parents=True, exist_ok=True)
            ok = (f[layout, e].exists() or r.make("expert", layout, e, str(f[layout, e]))) and ok
        return ok and not write_only

    if "smoke" in stages and need(("fp8", "high"), ("fp8", "low")):
        smoke = r.project("smoke", rel["fp8", "high"], rel["fp8", "low"], f"max_steps = {steps}\n")
        if r.train("train both experts from plain fp8 files (e4m3fn, no scales)", smoke):
            sample(r, smoke)

    if "default" in stages and need(("fp16", "high"), ("fp8", "low")):  # fp16 high, plain fp8 low
        default = r.project("default", rel["fp16", "high"], rel["fp8", "low"], recipe)
        states = state_dir(default)
        killed = r.train("train (default), SIGKILL after the first state", default,
                         kill_when=lambda: any(states.glob("high-step*.pt")))
        if killed and r.train("train --resume (fp16 high, plain fp8 low)", default, "--resume"):
            sample(r, default)

    if "pair" in stages and need(("fp16", "high"), ("fp8", "low")):  # both experts at once, sharing the GPU
        pair = r.project("pair", rel["fp16", "high"], rel["fp8", "low"], recipe + 'experts_parallel = "on"\n')
        states = state_dir(pair)
        killed = r.train("train both experts at once on one GPU, SIGKILL of `wanpair train`", pair,
                         kill_when=lambda: all(any(states.glob(f"{e}-step*.pt")) for e in ("high", "low")))
        if killed and r.orphans_saved(pair) and r.train("the same command again: both continue", pair):
            sample(r, pair)
            seq = r.project("pair-seq", rel["fp16", "high"], rel["fp8", "low"], recipe)
            r.train("the same pair one expert after the other (for the ratio)", seq, "--experts-parallel", "off")

    if "trust" in stages and need(("fp16", "high"), ("fp8", "low")):  # the pair stages' files
        trust(r, rel["fp16", "high"], rel["fp8", "low"])

    if "crash" in stages and need(("fp16", "high"), ("fp8", "low")):
        crash(r, rel["fp16", "high"], rel["fp8", "low"])

    if "settle" in stages and need(("fp16", "high"), ("fp8", "low")):
        settle(r, rel["fp16", "high"], rel["fp8", "low"])

    if "counts" in stages and need(("fp16", "high"), ("fp8", "low")):
        counts(r, rel["fp16", "high"], rel["fp8", "low"])

    if "runtime" in stages and need(("fp16", "high"), ("fp8", "low")):
        runtime(r, rel["fp16", "high"], rel["fp8", "low"])

    if "share" in stages and need(("fp16", "high"), ("fp8", "low")):
        share(r, rel["fp16", "high"], rel["fp8", "low"])

    if "i2v" in stages:  # the image-to-video pair, from video clips
        clips = (work / "videos").is_dir() or r.make("clips", str(work))
        if need(("i2v-fp8", "high"), ("i2v-fp8", "low")) and clips:
            i2v = r.project("i2v", rel["i2v-fp8", "high"], rel["i2v-fp8", "low"], f"max_steps = {steps}\n"
                            "validate_every_n_steps = 8\n", dataset="videos")
            if r.train(f"train the I2V pair (plain fp8 files, {I2V_CLIP[2]}-frame clips)", i2v):
                sample(r, i2v, image=work / "videos" / "clip_00" / "000.png", frames=I2V_CLIP[2])

    loras = sorted((work / "out-default").glob("WAN2.2-*Noise_rehearsal_default.safetensors"))
    if "export" in stages and loras and not write_only:
        for fmt in ("musubi", "comfy", "diffusers", "peft"):
            results = [r.cli(f"export {fmt}", "export", str(lo), "--format", fmt, "--overwrite") for lo in loras]
            r.record(f"export --format {fmt} (both LoRAs)", all(x[0] for x in results) and len(loras) == 2,
                     sum(x[2] for x in results), None, "" if all(x[0] for x in results) else _error(results[0][1]))
        ok, lines, seconds, _ = r.cli("inspect", "inspect", str(loras[0]))
        r.record("inspect", ok and any("expert:" in line for _, line in lines), seconds, None,
                 next((line.strip() for _, line in lines if line.startswith("expert:")), _error(lines)))

    if "low" in stages and need(("bf16", "high"), ("fp8-scaled", "low")):  # low memory mode
        low = r.project("low", rel["bf16", "high"], rel["fp8-scaled", "low"], recipe + 'memory_mode = "low"\n')
        r.train('train memory_mode = "low" (bf16 high, scaled fp8 low)', low)

    if "folder" in stages and need(("diffusers", "high"), ("fp8-scaled", "low")):
        folder = r.project("folder", rel["diffusers", "high"], rel["fp8-scaled", "low"],
                           f"max_steps = {max(4, steps // 3)}\nfp8_base = false\nvalidate_every_n_steps = 0\n")
        r.train("train (diffusers folder high; scaled fp8 low, fp8_base = false)", folder)

    if "merge" in stages and not write_only:  # the text encoder is not needed any more: room for a base and its merged copy
        rm(t5)
        low_base = ("fp8", "low") if f["fp8", "low"].exists() else ("fp8-scaled", "low")
        for expert, base in (("high", ("fp16", "high")), ("low", low_base)):
            layout_note = f"the {base[0]} {expert} base"
            name = f"WAN2.2-{expert.capitalize()}Noise_rehearsal_*.safetensors"
            lora = next((p for d in ("out-default", "out-folder", "out-low") for p in sorted((work / d).glob(name))), None)
            if lora is None:
                r.record(f"merge {expert}", False, 0.0, None, "no LoRA: run a train stage first")
                continue
            for key, path in f.items():
                if key != base:
                    rm(path.parent if key[0] == "diffusers" else path)
            if not (f[base].exists() or r.make("expert", *base, str(f[base]))):
                continue
            merged = work / f"merged_{expert}.safetensors"
            ok, lines, seconds, gib = r.cli(f"merge {expert}", "merge", "--base", str(f[base]), "--lora", str(lora),
                                            "--out", str(merged), "--overwrite")
            r.record(f"merge {lora.name} into {layout_note}", ok, seconds, gib,
                     f"{merged.stat().st_size / 1e9:.1f} GB written" if ok else _error(lines))
            rm(merged)

    if "wan21" in stages:  # Wan 2.1's single models: one LoRA over all timesteps
        if need(("w21-1.3B", "full")):  # found to be the 1.3B by its shapes: no model line
            small = r.project("wan21-1.3B", rel["w21-1.3B", "full"], None, recipe,
                              model="t2v-1.3B" if TINY else "")
            if r.train("train Wan 2.1 T2V 1.3B (fp16 file, told by its shapes)", small):
                sample(r, small)
        if need(("w21-fp8", "full")):
            big = r.project("wan21-14B", rel["w21-fp8", "full"], None, f"max_steps = {steps}\nvalidate_every_n_steps = 8\n")
            if r.train("train Wan 2.1 T2V 14B (plain fp8 file)", big):
                sample(r, big)
    return r.rows


def sample(r: Rehearsal, project: Path, image: Path | None = None, frames: int = 1) -> None:
    """Two prompts with both experts and their LoRAs: the time to the first image (what a user waits
    for, process start included) and to the next, with the log's own timings. `image`: the I2V pair's
    first frame, for clips of `frames` frames."""
    prompts = ["a red fox in the snow", "a blue teapot on a table"]
    i2v = ["--image", str(image), "--frames", str(frames)] if image else []
    ok, lines, seconds, gib = r.cli("sample", "sample", str(project), *sum((["--prompt", p] for p in prompts), []),
                                    "--steps", "8", *(["--width", "64", "--height", "64"] if TINY else []), *i2v,
                                    "--out", str(r.work / "samples"))
    wrote = [t for t, line in lines if line.startswith("wrote ")]
    marks = [f"{m.group(1)} {t:.1f} s" for t, line in lines
             if (m := re.search(r"(prompts ready|models ready|loading DiT|loading text encoder)", line))]
    note = (f"832x480{f', {frames} frames' if image else ''}, 8 steps: first output after {wrote[0]:.1f} s, second {wrote[1] - wrote[0]:.1f} s later "
            f"({', '.join(marks)})" if ok and len(wrote) == 2 else _error(lines))
    r.record(f"sample (the model(s) + LoRA(s), 2 prompts{', from a first frame' if image else ''})", ok and len(wrote) == 2,
             seconds, gib, note)


def trust(r: Rehearsal, high: str, low: str) -> None:
    """fp16 against bf16 on the high-noise expert, then a killed fp16 run continued (`rerun_continues`)."""
    quiet = "validate_every_n_steps = 0\n"
    bf16 = r.project("trust-bf16", high, low, f"max_steps = {r.steps}\n{quiet}")
    fp16 = r.project("trust-fp16", high, low, f'max_steps = {r.steps}\n{quiet}mixed_precision = "{FP16}"\n')
    fp8_layers = r"fp8 matmuls in \d+ layers" if TINY else r"fp8 matmuls in [1-9]\d* layers"  # none on a CPU
    ran = [r.train(f"train the high-noise expert, {label}", project, "--expert", "high", expect=(fp8_layers,))
           for label, project in (("defaults (bf16)", bf16), (f'mixed_precision = "{FP16}"', fp16))]
    if all(ran):
        fp16_against_bf16(r, bf16, fp16)
    rerun_continues(r, high, low, quiet)


def fp16_against_bf16(r: Rehearsal, bf16: Path, fp16: Path) -> None:
    """With fp8 matmuls serving fp16 compute too, fp16 trains at bf16's speed (within 10 %: the medians of two
    runs alike on one GPU differ by 1-3 %), and to the same per-epoch losses within 5 %: the same items,
    timesteps, noise and weights, so only rounding differs (and fp16's first steps, which the loss scaler may
    skip while its scale settles, leave an epoch a few items short) -- a loss scale left in the loss or an
    overflow is far more."""
    figures = {}
    for label, project in (("bf16", bf16), ("fp16", fp16)):
        steps = [x for x in metrics_rows(project) if x.get("expert") == "high" and "s_per_step" in x]
        summary = json.loads((state_dir(project).parent / "summary.json").read_text())
        losses = next(e["epoch_losses"] for e in summary["experts"] if e["expert"] == "high")
        figures[label] = median_step(steps), losses
    (b_step, b_loss), (f_step, f_loss) = figures["bf16"], figures["fp16"]
    ratio = f_step / b_step
    worst = max(abs(f - b) / b for f, b in zip(f_loss, b_loss))
    ok = (TINY or ratio <= 1.10) and len(f_loss) == len(b_loss) and worst <= 0.05  # speed: not on the CPU
    r.record("fp16 against bf16 (high-noise expert)", ok, 0.0, None,
             f"{f_step:.3f} vs {b_step:.3f} s/step ({ratio:.2f}x); per-epoch losses fp16 "
             f"{', '.join(f'{x:.4f}' for x in f_loss)} vs bf16 {', '.join(f'{x:.4f}' for x in b_loss)} "
             f"(largest difference {100 * worst:.1f} %)")


def rerun_continues(r: Rehearsal, high: str, low: str, quiet: str) -> None:
    """Both experts in fp16 with states every 2 steps and samples every 3, `wanpair train` killed once the
    high-noise expert saved a state; the same command with `memory_mode = "low"` added (how the work runs,
    not what is trained) must continue it, finish both LoRAs, and sample each expert with the other's LoRA
    only where this run made it: high's samples with the low-noise base, low's with high's LoRA."""
    prompts = r.work / "trust-prompts.txt"
    prompts.write_text("a red fox in the snow\n")
    width, height = (64, 64) if TINY else (832, 480)
    tables = (f'\n[sample]\nprompts = "{prompts.name}"\nevery_n_steps = 3\nwidth = {width}\nheight = {height}\n'
              'frames = 1\nsteps = 4\n')
    train = f'max_steps = 6\n{quiet}mixed_precision = "{FP16}"\nsave_state_every_n_steps = 2\nkeep_states = 1\n'
    project = r.project("trust-rerun", high, low, train, tables=tables)
    states = state_dir(project)
    if not r.train(f"{FP16} pair with states and samples, SIGKILL at high's state", project,
                   kill_when=lambda: any(states.glob("high-step*.pt"))):
        return
    r.project("trust-rerun", high, low, train + 'memory_mode = "low"\n', tables=tables)
    if not r.train('the same command, memory_mode = "low" added: continues', project,
                   expect=(r"continuing the high-noise expert from .*",)):
        return
    run = states.parent
    loras = [p.name for p in run.parent.glob("WAN2.2-*Noise_rehearsal_trust-rerun.safetensors")]
    made = {e: sorted(p.name for p in (run / "samples").glob(f"{e}-step*.png")) for e in ("high", "low")}
    named = {"high": "_highLora+lowBase.png", "low": "_highLora+lowLora.png"}  # low's LoRA not made yet / high's
    ok = len(loras) == 2 and all(made[e] and all(n.endswith(end) for n in made[e]) for e, end in named.items())
    r.record("samples during training (each with the LoRAs this run made)", ok, 0.0, None,
             f"{len(loras)} LoRAs; samples: {', '.join(made['high'] + made['low']) or 'none'}")


def crash(r: Rehearsal, high: str, low: str) -> None:
    """The defaults keep one crash state, renewed every tenth of the run: `wanpair train` killed outright after an
    intermediate LoRA and a crash state, the same command (no --resume) continues and finishes the pair; the
    size of a state and the time a save takes come from the `time:` line. Then with `crash_state = false`, killed
    after an intermediate LoRA and before any state: the same command sets the killed run's files aside and
    trains from the start."""
    from wanpair.train.state import list_states, state_step

    train = "max_steps = 20\nvalidate_every_n_steps = 0\nsave_every_n_steps = 3\n"
    project = r.project("crash", high, low, train)
    run = state_dir(project).parent
    if not r.train("defaults (a crash state every 2 of 20 steps), SIGKILL after an intermediate LoRA and a state",
                   project, kill_when=lambda: any(state_step(p) >= 4 for p in list_states(run, "high"))):
        return
    if r.train("the same command: continues from the crash state, finishes the pair", project,
               expect=(r"continuing the high-noise expert from high-step\d+\.pt \(step \d+\)",
                       r"states of \d+ MiB [\d.]+ s")):
        left = [p.name for p in list_states(run)]
        r.record("no state left once both experts finished", not left, 0.0, None, ", ".join(left) or "none")
    bare = r.project("crash-bare", high, low, train + "crash_state = false\n")
    out = state_dir(bare).parent.parent
    if r.train("crash_state = false, SIGKILL after an intermediate LoRA", bare,
               kill_when=lambda: any(out.glob("WAN2.2-HighNoise_*-step*.safetensors"))):
        r.train("the same command: sets the killed run's files aside, trains from the start", bare,
                expect=(r"they are set aside in \S+ \(nothing deleted\)",))


OVERFLOW_HOOK = """# rehearsal: the first REHEARSAL_OVERFLOW_STEPS training losses x 1e6, so fp16's backward overflows and the
# loss scaler skips those updates and halves its scale, as it does while its scale settles on real data
import os
if int(os.environ.get("REHEARSAL_OVERFLOW_STEPS", "0")):
    import wanpair.train.step as step
    real, calls = step.flow_matching_loss, [0]
    def overflowing(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * 1e6 if calls[0] <= int(os.environ["REHEARSAL_OVERFLOW_STEPS"]) else loss
    step.flow_matching_loss = overflowing
"""


def settle(r: Rehearsal, high: str, low: str) -> None:
    """fp16 whose loss scale settles (issue 39, item 2): the high-noise expert over one epoch of the 18 images (18
    step positions), its first 3 updates skipped by the scaler (their losses overflow fp16, forced by a
    sitecustomize hook); the run must end with its data at step 15, validate there, and say 3 were skipped."""
    hooks = r.work / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(OVERFLOW_HOOK)
    project = r.project("settle", high, low, f'mixed_precision = "{FP16}"\nepochs = 1\nvalidate_every_n_steps = 100\n'
                                             "log_with = []\n")
    env = dict(r.env)
    r.env |= {"REHEARSAL_OVERFLOW_STEPS": "3", "PYTHONPATH": f"{hooks}{os.pathsep}{r.env.get('PYTHONPATH', '')}"}
    try:
        ok = r.train(f"{FP16}: 3 updates skipped while the scale settles, data-limited (18 positions)", project,
                     "--expert", "high", expect=(r"15 steps, 3 updates skipped",))
    finally:
        r.env = env
    if not ok:
        return
    from safetensors import safe_open

    rows = [x for x in metrics_rows(project) if x["expert"] == "high"]
    reach = [x["steps_reachable"] for x in rows if "steps_reachable" in x]
    val = [x["step"] for x in rows if "val_loss" in x]
    lora = next((state_dir(project).parent.parent).glob("WAN2.2-HighNoise_*.safetensors"))
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata()
    summary = json.loads((state_dir(project).parent / "summary.json").read_text())
    skipped = re.findall(r'"skipped_updates": (\d+)', json.dumps(summary))
    r.record("it ends with its data, validated at its last step", reach[-1:] == [15] and val[-1:] == [15] and
             meta["ss_steps"] == "15" and meta.get("wanpair.validation_step") == "15" and skipped == ["3"], 0.0, None,
             f"steps_reachable {reach}, validated at steps {val}, LoRA ss_steps {meta['ss_steps']} validation step "
             f"{meta.get('wanpair.validation_step')}, summary skipped_updates {skipped}")


def counts(r: Rehearsal, high: str, low: str) -> None:
    """A state of another process count is refused when the run is planned (issue 39, item 3), shown on one GPU: the
    high-noise expert killed after its first state, that state's count rewritten to 2 (a data-parallel run's; one
    GPU cannot make one), and the same command again must refuse it within seconds, before the expert loads."""
    import torch

    regular = r.project("regular", high, low, f"max_steps = {r.steps}\nvalidate_every_n_steps = 0\nlog_with = []\n"
                                              "loraplus_lr_ratio = 4.0\nscale_weight_norms = 1.0\n")
    if r.train("LoRA+ (ratio 4) and max-norm (1.0), high-noise expert", regular, "--expert", "high"):
        rows = [x for x in metrics_rows(regular) if "max_key_norm" in x]
        r.record("max-norm logged per step", len(rows) == r.steps, 0.0, None,
                 f"{len(rows)} rows; last: keys_scaled {rows[-1]['keys_scaled']}, average_key_norm "
                 f"{rows[-1]['average_key_norm']:.3g}, max_key_norm {rows[-1]['max_key_norm']:.3g}" if rows else "none")
    project = r.project("counts", high, low, "max_steps = 8\nsave_state_every_n_steps = 2\nvalidate_every_n_steps = 0\n"
                                             "log_with = []\n")
    states = state_dir(project)
    if not r.train("high-noise expert, SIGKILL after its first state", project, "--expert", "high",
                   kill_when=lambda: any(states.glob("high-step*.pt"))):
        return
    path = sorted(states.glob("high-step*.pt"))[-1]
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["processes"] = 2
    torch.save(state, path)
    done, lines, seconds, gib = r.cli("the same command, its state saved by 2 processes", "train", str(project),
                                      "--expert", "high")
    text = "\n".join(line for _, line in lines)
    refused = not done and "state was saved by a run of 2 process(es) (GPUs)" in text
    r.record("a state of 2 processes on one GPU: refused when planned", refused and seconds < 60 and (gib or 0) < 2, seconds,
             gib, f"{'refused' if refused else 'NOT refused'} after {seconds:.1f} s, GPU memory used "
                  f"{gib or 0:.1f} GiB: {_error(lines)[:200]}")


def seconds_of(text: str) -> float:
    """The inverse of `wanpair.sizes.human_seconds`: '7.6 s', '3 min 24 s', '1 h 23 min'."""
    if m := re.fullmatch(r"(\d+) h (\d+) min", text):
        return 3600 * int(m[1]) + 60 * int(m[2])
    if m := re.fullmatch(r"(\d+) min (\d+) s", text):
        return 60 * int(m[1]) + int(m[2])
    return float(re.fullmatch(r"([\d.]+) s", text)[1])


def doctor_estimate(r: Rehearsal, project: Path) -> dict | None:
    """`wanpair doctor PROJECT`'s whole-run estimate, read from its line: total, and per expert its steps, validations
    and training states with their seconds; the rest (starting, caching, loading, compiling) as `other`."""
    ok, lines, _, _ = r.cli(f"doctor {project.stem}", "doctor", str(project))
    line = next((text for _, text in lines if "the run at an H100's measured speed" in text), None)
    if line is None:
        return None
    est = {"total": seconds_of(re.search(r"about (.+?) — ", line)[1]),
           "other": seconds_of(re.search(r"compiling ~(.+?)(?:;|$)", line)[1]), "experts": {}}
    for part in line.split(" — ", 1)[1].split("; "):
        if m := re.fullmatch(r"(\S+) (\d+) steps (.+?)(?: \+ (\d+) validations (.+?))?(?: \+ (\d+) states (.+?))?", part):
            name, steps, steps_s, vals, vals_s, states, states_s = m.groups()
            est["experts"][name] = dict(steps=int(steps), steps_s=seconds_of(steps_s), validations=int(vals or 0),
                                        validation_s=seconds_of(vals_s) if vals else 0.0, states=int(states or 0),
                                        states_s=seconds_of(states_s) if states else 0.0)
    return est


def runtime(r: Rehearsal, high: str, low: str) -> None:
    """Issue 41's whole-recipe target, checked without a 25-minute command: `wanpair doctor`'s estimate of a run
    shortened to --steps per expert (validations at its start, middle and end) against that run's own clocks
    (`summary.json`), stage by stage; then the doctor's estimate of the recipe itself (wanpair's defaults: 100
    epochs of 18 images, validation every 400 steps) against the recipe projected from the short run's measured
    stages (each expert's mean step after the first times the recipe's steps, its validations and states at their
    measured means, the rest as measured). The doctor's figures are the means of two of this stage's runs
    (2026-12-07, two H100s: docs/benchmarks.md, thirteenth and fourteenth rounds): a third run checks them. Cold
    compiles make a short run's total differ by machine (34 % between those two); the recipe's projection is the
    comparison that counts (both within 5 % of the doctor). A measured state's seconds are the loop's wait only; the
    steps beside its background write run slower and count as steps, while the doctor's figure for a state includes
    them: compare the totals."""
    from wanpair.models.tasks import expert_name
    from wanpair.sizes import human_seconds as human

    short = r.project("runtime", high, low, f"max_steps = {r.steps}\nvalidate_every_n_steps = {max(1, r.steps // 2)}\n")
    recipe = r.project("runtime-recipe", high, low, "")
    estimates = {p.stem: doctor_estimate(r, p) for p in (short, recipe)}
    if not r.record("doctor's whole-run estimates", all(estimates.values()), 0.0, None,
                    "; ".join(f"{k}: {human(v['total']) if v else 'no estimate line'}" for k, v in estimates.items())):
        return
    if not r.train(f"the run the estimate is of ({r.steps} steps per expert)", short):
        return
    summary = json.loads((state_dir(short).parent / "summary.json").read_text())
    measured = {"total": r.rows[-1]["seconds"], "experts": {}}  # the command's wall time, starting Python included
    for x in summary["experts"]:
        t = x["timings"]
        mean = t["steps_s"] / t["steps"]
        measured["experts"][expert_name(x["expert"])] = dict(
            steps=t["steps"] + 1, steps_s=mean * (t["steps"] + 1), mean_step=mean, validations=t["validations"],
            validation_s=t["validation_s"], states=t["states"], states_s=t["states_s"])
    measured["other"] = measured["total"] - sum(e["steps_s"] + e["validation_s"] + e["states_s"]
                                                for e in measured["experts"].values())
    est = estimates["runtime"]
    parts = [f"{name} steps {human(est['experts'][name]['steps_s'])} / {human(m['steps_s'])} "
             f"({m['mean_step']:.3f} s each), validations {human(est['experts'][name]['validation_s'])} / "
             f"{human(m['validation_s'])} ({m['validations']}), states {human(est['experts'][name]['states_s'])} / "
             f"{human(m['states_s'])} ({est['experts'][name]['states']} / {m['states']})"
             for name, m in measured["experts"].items()]
    ratio = est["total"] / measured["total"]
    r.record("doctor's estimate / the run's clocks", abs(ratio - 1) <= 0.10, 0.0, None,
             f"total {human(est['total'])} / {human(measured['total'])} ({ratio:.2f}); " + "; ".join(parts)
             + f"; the rest {human(est['other'])} / {human(measured['other'])}")
    whole = estimates["runtime-recipe"]
    projected = measured["other"] + sum(
        m["mean_step"] * e["steps"] + m["validation_s"] / max(1, m["validations"]) * e["validations"]
        + m["states_s"] / max(1, m["states"]) * e["states"]
        for e, m in ((whole["experts"][name], m) for name, m in measured["experts"].items()))
    ratio = whole["total"] / projected
    r.record("the recipe: doctor's estimate / projected from the run", abs(ratio - 1) <= 0.10, 0.0, None,
             f"{human(whole['total'])} / {human(projected)} ({ratio:.2f}); "
             + ", ".join(f"{name} {e['steps']} steps, {e['validations']} validations" for name, e in whole["experts"].items())
             + f"; the issue's target: 22 min ({'met' if projected <= 22 * 60 else 'not met'} by the projection)")


def share(r: Rehearsal, high: str, low: str) -> None:
    """Per-expert learning rates logged to Trackio (issue 40): the pair with [experts.high] learning_rate = 3e-5 and
    log_with = "trackio" into a local store, read back (a run per expert in one group, each with its own rate);
    then the ComfyUI workflow beside the LoRAs."""
    store = r.work / "trackio"
    os.environ["TRACKIO_DIR"] = r.env["TRACKIO_DIR"] = str(store)  # this process reads the store back
    project = r.project("share", high, low, f"max_steps = {r.steps}\nvalidate_every_n_steps = 8\nlearning_rate = 2e-4\n"
                                            'log_with = "trackio"\ntracker_project = "rehearsal"\n',
                        tables="\n[experts.high]\nlearning_rate = 3e-5\n")
    if not r.train('per-expert learning rates (high 3e-5, low 2e-4), log_with = "trackio"', project):
        return
    from trackio.sqlite_storage import SQLiteStorage

    runs = sorted(SQLiteStorage.get_runs("rehearsal"))
    ok, notes = runs == ["rehearsal_share-high", "rehearsal_share-low"], [f"runs {runs}"]
    for expert, lr in (("high", 3e-5), ("low", 2e-4)):
        logs = SQLiteStorage.get_logs("rehearsal", f"rehearsal_share-{expert}")
        steps = [x for x in logs if "loss" in x]
        config = SQLiteStorage.get_run_config("rehearsal", f"rehearsal_share-{expert}")
        good = (len(steps) == r.steps and abs(steps[0]["lr"] - lr) < 1e-12 and config["learning_rate"] == lr
                and config.get("_Group") == "rehearsal_share" and any("val_loss" in x for x in logs))
        ok = ok and good
        notes.append(f"{expert}: {len(steps)} steps, first lr {steps[0]['lr'] if steps else None}, config lr "
                     f"{config.get('learning_rate')}, group {config.get('_Group')}, "
                     f"{sum('val_loss' in x for x in logs)} validations")
    r.record("Trackio's local store: a run per expert, each its own rate", ok, 0.0, None, "; ".join(notes))
    done, lines, seconds, _ = r.cli("export --workflow", "export", str(project), "--workflow")
    r.record("wanpair export --workflow", done, seconds, None, _error(lines) if not done else lines[-1][1][:160])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, nargs="?", help="an empty folder on a disk with ~60 GB free")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per expert in the train paths")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(QUICK + STAGES)}")
    ap.add_argument("--write-only", action="store_true", help="write the inputs of the stages, run nothing")
    ap.add_argument("--logs", type=Path, help="where each command's log goes (default: WORK/logs)")
    ap.add_argument("--tiny", action="store_true", help="toy-size models on the CPU: try the rehearsal itself")
    ap.add_argument("--make", nargs="+", help=argparse.SUPPRESS)  # internal: one writer, in its own process
    args = ap.parse_args()
    if args.tiny and not TINY:
        os.environ["REHEARSAL_TINY"] = "1"
        return subprocess.run([sys.executable, __file__, *sys.argv[1:]]).returncode
    if args.make:
        what, *rest = args.make
        {"expert": lambda: make_expert(rest[0], rest[1], Path(rest[2])), "t5": lambda: make_text_encoder(Path(rest[0])),
         "small": lambda: make_small_inputs(Path(rest[0])), "clips": lambda: make_clips(Path(rest[0]))}[what]()
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    rows = rehearse(args.work.resolve(), args.steps, tuple(args.stages.split(",")), args.write_only, args.logs)
    lines = ["| path | result | s | peak GPU GiB | notes |", "|---|---|---|---|---|"]
    lines += [f"| {x['path']} | {'ok' if x['ok'] else 'FAILED'} | {x['seconds']} | {x['peak_gpu_gib'] or ''} | "
              f"{x['note']} |" for x in rows]
    (args.work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(x["ok"] for x in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
