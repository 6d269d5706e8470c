"""The `wanpair` command."""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import sys
import warnings
from pathlib import Path

# Before torch touches the GPU: growable allocator segments waste less memory to fragmentation when
# block streaming and checkpointing allocate and free many differently sized buffers.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# torch.compile's caches (inductor's compiled graphs and kernels) where they outlive a reboot, so that the
# second run's first step reuses the first run's kernels instead of compiling again (inductor's default,
# /tmp/torchinductor_<user>, is often emptied at boot).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                                     / "wanpair" / "torch-compile"))
# AOTAutograd's cache (a compiled block's traced forward and backward) passes over graphs holding a custom
# autograd.Function unless told otherwise, and the fp8 matmul is one: then every run traces the block again
# (~8 s of the second run's first step on an H200). Allowed, with the source of wanpair's autograd Functions
# and custom ops in every compile cache's key, so that changed code never reuses a graph traced from the old one.
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD", "1")
os.environ.setdefault("TORCH_COMPILE_CACHE_KEY_TAG", "wanpair-" + hashlib.sha256(b"".join(
    (Path(__file__).parent / f).read_bytes() for f in ("models/fp8.py", "models/attention.py", "train/streaming.py"))).hexdigest()[:16])

from . import __version__
from .atomic import writable_from
from .errors import StopRequested, WanpairError
from .logs import configure_logging
from .models.tasks import TASKS, expert_name, expert_noun

TOKEN_VARIABLE = "WANPAIR_DASHBOARD_TOKEN"  # the dashboard's token, kept out of the process list

DESCRIPTION = """\
Train the LoRA pair that Wan 2.2 T2V A14B needs -- one LoRA for the high-noise expert
(timesteps 875-1000) and one for the low-noise expert (0-875) -- from one project file.
Also the Wan 2.2 I2V A14B pair, and Wan 2.1 T2V 14B / 1.3B (one model, one LoRA): --model.

  wanpair demo                      try everything on a tiny built-in example (CPU, ~1 minute)

On a fresh GPU machine:
  wanpair download                  fetch the recipe's weight files from the Hugging Face Hub
  wanpair caption my_dataset/       write a .txt caption for every image that has none (Qwen2.5-VL)
  wanpair init my_dataset/          write dataset.toml + wanpair.toml for a folder of images and captions
  wanpair doctor wanpair.toml       check the machine and the project before a long run

Then:
  wanpair check wanpair.toml        find dataset problems before spending GPU time
  wanpair cache wanpair.toml        encode latents + captions (train does this too)
  wanpair train wanpair.toml        check, cache, train both experts, save both LoRAs
  wanpair sample wanpair.toml --prompt "..."   see what the pair does (both experts, like Wan 2.2)
  wanpair inspect LORA / export / merge        which expert a LoRA is for; convert; bake into a base
  wanpair push wanpair.toml --repo USER/NAME   share the pair, a model card and samples on the Hugging Face Hub
  wanpair dashboard                 make, start, queue and watch runs in the browser (local)

A project file (wanpair.toml) names your model files, your Musubi-style dataset.toml and a
run name; every training setting defaults to the proven recipe. `wanpair demo` writes one
you can copy.

The network is used by download and push, and by train with [hub] (pushing what it saves),
--resume-from-hub, or log_with = "wandb" (unless WANDB_MODE=offline).
"""
GUIDE = """\
The user guide is the Markdown in the repository's docs/ folder (or `mkdocs serve`):
  docs/getting-started.md    the demo, a bare GPU box, training on the real weights
  docs/commands.md           every command; `wanpair COMMAND --help` names its page
  docs/reference.md          every key of wanpair.toml, with its default and range
  docs/troubleshooting.md    every error message, with its fix
"""


def _project(path: str, require_models: bool = True):
    from .project import load_project

    project, warns = load_project(path, require_models)
    for w in warns:
        print(f"WARNING {w}")
    return project


def _writable_out(out: Path, overwrite: bool, folder: bool = False, inputs: dict[str, str] | None = None) -> None:
    """Refuse, before any reading, an output that would replace what the user has or cannot be written: an
    existing one without --overwrite, an input of the command itself, a folder where a file goes (or the
    reverse), a place no folder can be made or written."""
    for option, given in (inputs or {}).items():
        if out.exists() and Path(given).exists() and os.path.samefile(out, given):
            raise WanpairError(f"--out {out} is {option} itself; write the result to another path.")
    if out.exists():
        if out.is_dir() != folder:
            kind = "a peft adapter (a folder)" if folder else "a single file"
            raise WanpairError(f"{out} is {'a file' if out.is_file() else 'a folder'}, and this writes {kind}: "
                               "give --out a path of that kind.")
        if not overwrite:
            raise WanpairError(f"{out} already exists; pass --overwrite to replace it.")
    where, writable = writable_from(out.absolute().parent)
    if not writable:
        raise WanpairError(f"{where} is not a folder wanpair can write to (read-only?); choose another --out.")


def cmd_demo(args) -> int:
    from .demo import make_demo
    from .project import load_project
    from .train.recipe import LoraPairRecipe

    root = Path(args.dir).resolve()
    task = TASKS[args.model]
    print(f"writing the demo dataset, tiny random models ({task.title}) and project to {root}")
    project_file = make_demo(root, task)
    project, _ = load_project(project_file)
    results = LoraPairRecipe(project, overwrite=True).run()
    from .sample import SampleSettings, sample

    if task.conditioned:  # a clip from the first frame of a training clip
        prompt = (root / "dataset" / "clip_01.txt").read_text().strip()
        settings = SampleSettings.for_task(task, width=64, height=48, frames=9, steps=10,
                                           image=str(root / "dataset" / "clip_01" / "000.png"))
    else:
        prompt = (root / "dataset" / "img_01.txt").read_text().strip()
        settings = SampleSettings.for_task(task, width=64, height=64, steps=10)
    print(f"\nsampling '{prompt}' with " + ("both experts and their LoRAs" if task.paired else "the model and its LoRA"))
    (picture,) = sample(project, [prompt], settings, {r.expert: r.lora for r in results}, project.run_dir / "samples")
    print("\nDemo finished. The LoRA pair:" if task.paired else "\nDemo finished. The LoRA:")
    for r in results:
        print(f"  {expert_name(r.expert)}: {r.lora}")
        print("     mean loss per epoch: " + " ".join(f"{x:.3f}" for x in r.epoch_losses))
    print(f"Sample (tiny random models, so expect noise, not art): {picture}")
    print(f"\nProject file: {project_file}  (copy it and point [models] at your real weights)")
    print(f"Watch the run in the browser: wanpair dashboard {root}")
    return 0


def cmd_download(args) -> int:
    from .setup.download import download
    from .setup.scaffold import set_models_table

    if args.captioner:
        (folder,) = download(Path(args.dir).resolve(), captioner=True).values()
        option = "" if Path(args.dir).resolve() == Path("models").resolve() else f" --captioner {folder}"
        print(f"the captioner is in {folder} and verified; `wanpair caption DATASET_DIR{option}` uses it"
              + (" (or name it as [models] captioner in the project)" if option else ""))
        return 0
    paths = download(Path(args.dir).resolve(), args.variant, args.model)
    print(f"all {len(paths)} model entries are in {Path(args.dir).resolve()} and verified")
    print(set_models_table(Path(args.project).resolve(), paths, TASKS[args.model]))
    return 0


def cmd_init(args) -> int:
    from .data.dataset_config import load_dataset_config
    from .data.items import check_dataset
    from .setup.scaffold import plan_init

    project = Path(args.project).resolve()
    # the files' texts first: what init would refuse is refused before a captioner loads
    plan = plan_init(Path(args.dataset_dir), project, args.name, Path(args.models).resolve(), args.force,
                     TASKS[args.model])
    if args.caption:  # then the captions, so that the check below sees them
        from .caption import caption_folder, find_captioner

        report = caption_folder(args.dataset_dir, find_captioner(project, Path(args.models)), trigger=args.trigger)
        print(report.render())
    for line in plan.write():
        print(line)
    report = check_dataset(load_dataset_config(Path(args.dataset_dir).resolve() / "dataset.toml"),
                           task=TASKS[args.model])
    print(report.render())
    uncaptioned = sum("no caption file" in e for e in report.errors)
    if uncaptioned:  # the next step is the captions, not the doctor
        print(f"\nnext: {uncaptioned} file(s) have no caption: write them, or `wanpair caption {args.dataset_dir}` "
              f"(docs/captioning.md); then wanpair doctor {args.project}")
    elif report.errors:
        print(f"\nnext: fix the errors above, then wanpair doctor {args.project}")
    else:
        print(f"\nnext: wanpair doctor {args.project}   then: wanpair train {args.project}")
    return 1 if report.errors else 0


def cmd_caption(args) -> int:
    from .caption import DEFAULT_PROMPT, caption_folder, find_captioner, read_prompt

    prompt = read_prompt(args.prompt) if args.prompt else DEFAULT_PROMPT
    captioner = Path(args.captioner).resolve() if args.captioner else find_captioner(Path(args.project), Path("models"))
    report = caption_folder(args.dir, captioner, trigger=args.trigger, prompt=prompt, force=args.force,
                            dry_run=args.dry_run, device=args.device, precision=args.precision,
                            batch_size=args.batch_size)
    print(report.render())
    dataset = Path(args.dir) / "dataset.toml"
    if report.written and not args.dry_run:
        print(f"\nread them: wanpair check {dataset} --captions" if dataset.is_file() else
              f"\nnext: wanpair init {args.dir}   (then `wanpair check {dataset} --captions` lists them)")
    return 1 if report.failed else 0


def cmd_doctor(args) -> int:
    from .setup.doctor import doctor

    checks, ok = doctor(Path(args.project) if args.project else None)
    for c in checks:
        print(c.render())
    print("\n" + ("ready: `wanpair train` would start." if ok else "not ready: fix the ✗ lines above."))
    return 0 if ok else 1


def cmd_dashboard(args) -> int:
    from .dashboard.app import serve

    roots = [Path(d) for d in (args.dirs or ["."])]
    for root in roots:
        if not root.is_dir():
            raise WanpairError(f"{root} is not a folder; give the output folders your runs write to (default: .).")
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    if args.token:
        print(f"warning: a token given with --token is in the process list, which every user of this machine can "
              f"read (ps); set it in the environment instead: {TOKEN_VARIABLE}=... wanpair dashboard", file=sys.stderr)
    serve(roots, args.host, args.port, token, args.allow_host)
    return 0


def cmd_check(args) -> int:
    from .data.dataset_config import load_dataset_config
    from .data.items import check_dataset
    from .models.text_encoder import load_tokenizer
    from .tomlfile import read_toml

    path, raw = read_toml(args.file, "Give a wanpair.toml project or a Musubi dataset.toml.")
    tokenizer, task = None, None
    if "models" in raw:  # a project file: its dataset, with its tokenizer for caption lengths (once it is set)
        project = _project(args.file, require_models=False)
        dataset_config, task, where = project.dataset_config, project.task, project.models.tokenizer
        if where is None or not where.exists():
            state = "is not set" if where is None else f"{where} is not there"
            print(f"caption lengths not checked: [models] tokenizer {state} yet (`wanpair download` fetches it)")
        else:
            tokenizer = load_tokenizer(where)
    else:
        dataset_config = path
    report = check_dataset(load_dataset_config(dataset_config), tokenizer, task=task)
    print(report.render())
    if args.captions:
        for image, caption in dict((it.image, it.caption) for it in report.items).items():
            print(f"\n{image.name}: {caption}")
    return 1 if report.errors or report.warnings else 0


def cmd_cache(args) -> int:
    from .cache import stale_entries
    from .sizes import human_bytes
    from .train.recipe import LoraPairRecipe

    recipe = LoraPairRecipe(_project(args.project), overwrite=True)
    recipe.preflight(())
    recipe.prepare_caches()
    cplan = recipe.cache_plan
    stale = stale_entries({s.cache_dir for s in recipe.checked.specs},
                          set(cplan.latent_paths) | set(cplan.text_paths) | set(cplan.prompt_paths))
    if stale:
        size = human_bytes(sum(p.stat().st_size for p in stale))
        if args.prune:
            for p in stale:
                p.unlink()
            print(f"removed {len(stale)} stale cache entries ({size})")
        else:
            print(f"{len(stale)} stale cache entries ({size}) that this project no longer uses (a caption, image or "
                  f"model changed); `wanpair cache {args.project} --prune` removes them")
    return 0


def cmd_train(args) -> int:
    from .train.recipe import LoraPairRecipe

    if int(os.environ.get("RANK", "0")) != 0:  # started by torchrun / accelerate launch: rank 0 speaks for all
        sys.stdout = open(os.devnull, "w")
    project = _project(args.project)
    experts = project.task.experts if args.expert == "both" else (args.expert,)
    if args.expert != "both" and not project.task.paired:
        raise WanpairError(f"--expert {args.expert}: {project.task.name} is one model with one LoRA over all "
                           "timesteps; --expert picks an expert of a Wan 2.2 pair. Leave it out.")
    if args.experts_parallel:
        project.train.experts_parallel = args.experts_parallel
    if args.resume_from_hub and (args.resume or args.overwrite):
        raise WanpairError("--resume-from-hub continues from the states it fetches: leave out --resume and --overwrite.")
    results = LoraPairRecipe(project, overwrite=args.overwrite, allow_expert_mismatch=args.allow_expert_mismatch,
                             gpus=args.gpus).run(experts, resume=args.resume, resume_from_hub=args.resume_from_hub)
    for r in results:
        print(f"{expert_name(r.expert)} LoRA: {r.lora}")
    return 0


def cmd_inspect(args) -> int:
    from .export.formats import describe, read_lora

    problems = []
    for i, path in enumerate(args.lora):  # a pair at once: `wanpair inspect output/*.safetensors`
        try:
            print(("\n" if i else "") + describe(read_lora(path), Path(path)))
        except WanpairError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise WanpairError(problems[0])
    if problems:
        raise WanpairError(f"{len(problems)} of the {len(args.lora)} LoRAs cannot be read:\n" +
                           "\n".join(f"- {p}" for p in problems))
    return 0


def cmd_export(args) -> int:
    from .export.formats import read_lora, write_lora
    from .train.lora import DTYPES

    if args.workflow:
        return export_workflow(args)
    if not args.format:
        raise WanpairError("--format is required to convert a LoRA (--workflow PROJECT writes a ComfyUI workflow).")
    src = Path(args.lora)
    out = Path(args.out) if args.out else src.with_name(f"{src.stem}_{args.format}" + ("" if args.format == "peft" else ".safetensors"))
    _writable_out(out, args.overwrite, folder=args.format == "peft", inputs={"the LoRA": args.lora})
    lora = read_lora(args.lora)
    write_lora(lora, out, args.format, DTYPES[args.dtype] if args.dtype else None)
    deltas = len(lora.diffs) + len(lora.bias_diffs)
    print(f"wrote {out} ({args.format} layout, {len(lora.modules)} modules" + (f", {deltas} deltas)" if deltas else ")"))
    return 0


def export_workflow(args) -> int:
    """`export PROJECT --workflow`: the ComfyUI workflow of the project's LoRAs (training writes it too)."""
    from .export.workflow import workflow_path, write_workflow

    if args.format or args.dtype:
        raise WanpairError("--workflow writes a project's ComfyUI workflow; --format and --dtype convert a LoRA.")
    project = _project(args.lora)
    out = Path(args.out) if args.out else workflow_path(project)
    if args.out:  # else the project's own workflow, rewritten as training writes it
        _writable_out(out, args.overwrite)
    print(f"wrote {write_workflow(project, out)} (drag it onto ComfyUI's canvas)")
    missing = [p.name for p in map(project.lora_path, project.task.experts) if not p.exists()]
    if missing:
        print(f"note: it loads {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not trained yet")
    return 0


def cmd_merge(args) -> int:
    from .export.formats import read_lora
    from .export.merge import merge_into_file
    from .models.dit import inspect_dit
    from .models.tasks import by_architecture, check_task, identify_task

    base, out = Path(args.base), Path(args.out)
    _writable_out(out, args.overwrite, inputs={"the --base file": args.base, "the --lora file": args.lora})
    try:
        info = inspect_dit(base)
    except WanpairError as e:
        raise WanpairError(f"--base: {e}") from None  # "this slot" is --base
    lora = read_lora(args.lora)
    c = info.config
    task = identify_task(c["in_channels"], (c["num_attention_heads"] * c["attention_head_dim"], c["num_layers"],
                                            c["ffn_dim"]), base)
    trained = by_architecture(lora.metadata.get("wanpair.architecture"))
    if trained and (trained.version, trained.in_channels) == (task.version, task.in_channels):
        task = trained  # e.g. Wan 2.1 14B or 1.3B: the LoRA says which; check_task refuses a size that is not
    check_task(info.config, base, task, "--base")  # refuses what wanpair does not train, naming it
    n = merge_into_file(base, lora, out, task, args.strength, args.allow_expert_mismatch)
    print(f"wrote {out}: {n} layers merged at strength {args.strength}")
    return 0


def cmd_push(args) -> int:
    from .export.hub import push_pair
    from .hub import parse_repo

    project = _project(args.project)
    repo = args.repo or project.hub.repo
    if not repo:
        raise WanpairError("--repo USER/NAME: the model repository to push to (or set [hub] repo in the project).")
    parse_repo(repo, "--repo")
    push_pair(project, repo, private=args.private or project.hub.private, states=args.states, dry_run=args.dry_run)
    return 0


def cmd_timesteps(args) -> int:
    from .train.timestep_report import draw, text_histogram, write_csv, write_png

    project = _project(args.project)
    if project.task.paired and args.expert is None:
        raise WanpairError("--expert high or --expert low: which expert's timesteps to draw.")
    if not project.task.paired and args.expert:
        raise WanpairError(f"--expert {args.expert}: {project.task.name} is one model; leave --expert out.")
    expert = args.expert or "full"
    t, w = project.train, project.experts[expert]
    values = draw(project, expert, args.n)
    title = (f"{expert_name(expert)} {'expert' if project.task.paired else 'model'}, window {w.min_timestep}-"
             f"{w.max_timestep}, {t.timestep_sampling} "
             f"(shift {t.discrete_flow_shift}, preserve shape {t.preserve_distribution_shape})")
    print(title)
    window = (w.min_timestep, w.max_timestep)
    print(text_histogram(values, window))
    out = project.run_dir
    png = Path(args.png) if args.png else out / f"timesteps_{expert}.png"
    print(f"wrote {write_png(values, png, title, window)}")
    if args.csv:  # the raw draws go beside the plot, wherever --png put it
        print(f"wrote {write_csv(values, png.with_suffix('.csv'))}")
    return 0


def _prompts(args) -> list[str]:
    from .project import read_prompts

    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise WanpairError(f"prompts file {path} does not exist.")
        prompts += read_prompts(path)
    return prompts


def cmd_sample(args) -> int:
    from .sample import SampleSettings, sample

    project = _project(args.project)
    task = project.task
    misplaced = [flag for dest, flag in (PAIR_OPTIONS if not task.paired else SINGLE_OPTIONS).items()
                 if getattr(args, dest) is not None]
    if misplaced:
        raise WanpairError(f"{' '.join(misplaced)}: " + (
            f"{task.name} is one model; use --lora, --strength and --guidance." if not task.paired else
            "a Wan 2.2 pair has two LoRAs: --lora-high and --lora-low (--strength and --guidance set both experts')."))
    for dest, given in (("strength", args.strength), ("guidance", args.guidance)):  # the specific options win
        for one in ("high", "low", "full"):
            if given is not None and getattr(args, f"{dest}_{one}", None) is None:
                setattr(args, f"{dest}_{one}", given)
    loras = {}
    for expert in task.experts:
        given = getattr(args, f"lora_{expert}")
        path = Path(given) if given else project.lora_path(expert)
        if args.no_lora:
            path = None
        elif not path.exists():
            if given:
                raise WanpairError(f"LoRA {path} does not exist.")
            print(f"note: {path.name} not found; {expert_noun(expert)} runs without a LoRA")
            path = None
        loras[expert] = path
    settings = SampleSettings.for_task(project.task, **{k: v for k, v in vars(args).items()
                                                        if k in SampleSettings.__dataclass_fields__ and v is not None})
    out = Path(args.out) if args.out else project.run_dir / "samples"
    sample(project, _prompts(args), settings, loras, out, allow_mismatch=args.allow_expert_mismatch)
    return 0


# `sample` options of one kind of model, refused (not ignored) on the other
PAIR_OPTIONS = {d: "--" + d.replace("_", "-") for d in ("lora_high", "lora_low", "strength_high", "strength_low",
                                                          "guidance_high", "guidance_low")}
SINGLE_OPTIONS = {"lora_full": "--lora"}


def _whole(least: int, most: int | None = None):
    """An argparse type: a whole number in [least, most], so `-n 0` or `--port -5` is a usage error naming the
    option, not a traceback from deep inside."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"{value}: give a whole number from {least}" +
                                             (f" to {most}" if most is not None else " up"))
        return value
    parse.__name__ = "whole number"  # argparse's "invalid whole number value: 'x'" for a non-number
    return parse


def _guide(*pages: str) -> str:
    """Where the user guide covers a command. The guide is not published: it is the Markdown in the
    repository's docs/ folder, which `mkdocs serve` shows as a site (tests/test_docs.py checks the pages exist)."""
    return "guide: " + ", ".join(f"docs/{page}.md" for page in pages) + " (or `mkdocs serve`)"


def _model_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", choices=list(TASKS), default="t2v-A14B",
                   help=f"{what}: t2v-A14B (Wan 2.2 text to video, the default), i2v-A14B (Wan 2.2 image to video), "
                        "t2v-14B or t2v-1.3B (Wan 2.1 text to video: one model, one LoRA)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanpair", description=DESCRIPTION, epilog=GUIDE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wanpair {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show the messages of diffusers, transformers, accelerate and peft")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", epilog=_guide("getting-started"),
                       help="run the whole recipe on a tiny built-in example (no downloads, CPU)",
                       description="Generate 18 small images with captions and tiny random Wan models in the real "
                                   "file formats, then train the LoRA pair on them with the normal train path.")
    p.add_argument("--dir", default="wanpair-demo", help="where to write the demo (default: ./wanpair-demo)")
    _model_option(p, "which pair's demo (i2v-A14B: on short video clips)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("download", epilog=_guide("getting-started"),
                       help="fetch the recipe's weight files from the hub (resumable, verified)",
                       description="Download exactly the files of the recipe with huggingface_hub: both Wan 2.2 T2V "
                                   "A14B experts (Comfy-Org repackaged), wan_2.1_vae.safetensors, "
                                   "models_t5_umt5-xxl-enc-bf16.pth and the umT5 tokenizer (Wan-AI). Files already "
                                   "there are checked against the hub's hashes and kept; a broken transfer resumes. "
                                   "Uses HF_TOKEN or your `hf auth login`, and HF_ENDPOINT for a mirror. Writes the "
                                   "[models] table of the project file.")
    p.add_argument("--dir", default="models", help="where the files go (default: ./models)")
    _model_option(p, "which pair's experts to fetch")
    p.add_argument("--variant", choices=("fp16", "fp8"), default="fp16",
                   help="fp16: the recipe's experts (2 x 28.6 GB); fp8: ComfyUI's scaled fp8 experts (2 x 14.3 GB). "
                        "wanpair trains on fp8 weights either way")
    p.add_argument("--project", default="wanpair.toml",
                   help="the project file whose [models] table is written (created if missing; default ./wanpair.toml)")
    p.add_argument("--captioner", action="store_true",
                   help="fetch only the captioner of `wanpair caption` instead: Qwen2.5-VL-7B-Instruct (16.6 GB) "
                        "into DIR/Qwen2.5-VL-7B-Instruct; the project file is left as it is")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("caption", epilog=_guide("captioning"),
                       help="write a .txt caption beside every image and clip that has none (Qwen2.5-VL, GPU)",
                       description="Caption the images and video clips of DIR with a vision-language model "
                                   "(Qwen2.5-VL-7B-Instruct; `wanpair download --captioner` fetches it): NAME.txt beside "
                                   "NAME.png, one dense English paragraph in the style Wan was trained on (subject, "
                                   "action, setting, camera, lighting), the trigger words first. A clip is described "
                                   "from 8 frames spread across it. Captions already there are kept unless --force. "
                                   "Needs a CUDA GPU (bf16, or fp8 weights when memory is short; 16 GB is enough). "
                                   "Exit 0 when every file got its caption, 1 when some failed (listed).")
    p.add_argument("dir", help="the folder with your images (or clips)")
    p.add_argument("--trigger", default="", help='words that start every caption, e.g. --trigger "sks person"')
    p.add_argument("--prompt", metavar="FILE",
                   help="a text file with your own instruction for the captioner (default: the one in "
                        "docs/captioning.md)")
    p.add_argument("--force", action="store_true", help="replace captions that are there already")
    p.add_argument("--dry-run", action="store_true", help="print the captions it would write; write nothing")
    p.add_argument("--captioner", metavar="FOLDER",
                   help="the Qwen2.5-VL folder (default: [models] captioner of --project, else "
                        "./models/Qwen2.5-VL-7B-Instruct)")
    p.add_argument("--project", default="wanpair.toml", help="the project whose [models] captioner to use, if it "
                                                             "names one (default ./wanpair.toml)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto (default): the GPU when there is one. The 7B model is refused on the CPU")
    p.add_argument("--precision", choices=("auto", "bf16", "fp8"), default="auto",
                   help="the weights on the GPU: auto (default) = bf16 when it fits in free memory, else fp8")
    p.add_argument("--batch-size", type=_whole(1), default=8, help="files captioned at once (default 8: twice as fast as 4 on an H200, 18 GiB at 960x960)")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("init", epilog=_guide("getting-started"),
                       help="write dataset.toml and wanpair.toml for a folder of images (or videos) and captions",
                       description="Write the recipe's dataset.toml into DATASET_DIR (960x960 buckets, .txt captions, "
                                   "batch 1; 81-frame clips for videos) and a wanpair.toml with every training setting "
                                   "shown at its default, models taken from the file `wanpair download` wrote or found "
                                   "under --models; then check the dataset. Existing files are kept unless --force.")
    p.add_argument("dataset_dir", help="the folder with your images (or videos) and same-name .txt captions")
    p.add_argument("--name", help="run name (default: the folder's name)")
    p.add_argument("--models", default="models", help="where to look for the weight files (default: ./models)")
    _model_option(p, "which pair the project trains (i2v-A14B needs video clips)")
    p.add_argument("--project", default="wanpair.toml", help="the project file to write (default: ./wanpair.toml)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset.toml / project file")
    p.add_argument("--caption", action="store_true",
                   help="first write the captions that are missing, as `wanpair caption` does (a GPU and the "
                        "captioner: `wanpair download --captioner`)")
    p.add_argument("--trigger", default="", help='with --caption: words that start every new caption, e.g. "sks person"')
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("doctor", epilog=_guide("getting-started", "speed-memory"),
                       help="checklist: will training start here, with what memory plan and speed",
                       description="Check Python, torch and its CUDA build, the GPUs, bf16/fp8 support, and for a "
                                   "project: the models (kinds and experts), the dataset, the tokenizer, caches, disk, "
                                   "what train would do with the run's earlier work (keep, continue or refuse), "
                                   "the memory plan this GPU would get with its expected s/step, whether a run on one GPU "
                                   "replays its steps as CUDA graphs, and host RAM for streamed blocks. Exit 0 when "
                                   "training would start, 1 otherwise.")
    p.add_argument("project", nargs="?", help="a wanpair.toml (without it: only the machine is checked)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("dashboard", epilog=_guide("dashboard"),
                       help="make, start, stop, continue, queue and watch LoRA-pair runs in the browser (local)",
                       description="Serve a web page over the given folders: make a new run from a folder of media "
                                   "and captions (the check report, the model files, the settings; it writes what "
                                   "`wanpair init` writes), start it with the doctor's plan shown first, stop it "
                                   "(Ctrl-C: state and partial LoRAs saved), continue it, queue runs one after another "
                                   "(one training at a time); watch every run (<output_dir>/<name>/metrics.jsonl): "
                                   "state, steps and ETA of both experts, loss, validation loss, learning rate, speed "
                                   "and memory side by side and live, the log, the samples in a grid, the LoRA files "
                                   "to download. Prints a URL with a token: every request for your data, and every one that writes or starts, "
                                   "needs it. "
                                   "Works offline; reads and writes only inside the folders given.")
    p.add_argument("dirs", nargs="*", metavar="DIR",
                   help="folders to find runs and datasets in, and the only ones it writes to (default: the current "
                        "folder); the queue is kept in the first one's .wanpair-dashboard/")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; another prints a warning)")
    p.add_argument("--port", type=_whole(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument("--token", help=f"the token every request must carry (default: ${TOKEN_VARIABLE}, else a new random "
                                   "one); other users of this machine can read it in the process list: prefer "
                                   f"${TOKEN_VARIABLE}")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests made to this host name (repeat for more); by default only localhost "
                        "and IP addresses, so that no web page can reach it by DNS rebinding; '*': any name")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("check", epilog=_guide("datasets"),
                       help="report dataset problems (missing captions, broken images, ...)",
                       description="Check a dataset without loading any model: images without captions, captions "
                                   "without images, empty captions, unreadable images, images smaller than their "
                                   "bucket, duplicates, over-long captions, and the bucket table. Exit code 0 = "
                                   "clean, 1 = problems found.")
    p.add_argument("file", help="a wanpair.toml project or a Musubi dataset.toml")
    p.add_argument("--captions", action="store_true", help="also print every item's caption, to read them over")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("cache", epilog=_guide("datasets"),
                       help="encode VAE latents and caption embeddings for a project",
                       description="Encode what is not cached yet. Entries are keyed by content (image bytes, "
                                   "caption, bucket, model fingerprints), so edits re-encode exactly what changed; "
                                   "the entries they replace are listed as stale.")
    p.add_argument("project", help="the wanpair.toml project file")
    p.add_argument("--prune", action="store_true",
                   help="remove stale entries from this project's cache folders (in a folder several projects "
                        "share, the others' entries go too; they are re-encoded when needed)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", epilog=_guide("training", "multi-gpu", "what-happens-if"),
                       help="check, cache and train the high- and low-noise LoRAs",
                       description="Run the whole recipe: check the dataset, cache latents and text, train the "
                                   "high-noise LoRA on timesteps 875-1000 and the low-noise LoRA on 0-875, and save "
                                   "WAN2.2-HighNoise_<name>.safetensors and WAN2.2-LowNoise_<name>.safetensors "
                                   "(I2V: 900 is the boundary). A Wan 2.1 model trains one LoRA on 0-1000: "
                                   "WAN2.1-14B_<name>.safetensors (or WAN2.1-1.3B_...).")
    p.add_argument("project", help="the wanpair.toml project file")
    p.add_argument("--expert", choices=("both", "high", "low"), default="both",
                   help="train only one expert of a Wan 2.2 pair")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: replace the LoRA files of this name and remove the earlier run's states, "
                        "intermediate LoRAs, metrics and samples (nothing is removed without it)")
    p.add_argument("--allow-expert-mismatch", action="store_true",
                   help="continue from an init_lora even if its metadata names the other expert")
    p.add_argument("--resume", nargs="?", const="latest", metavar="STATE",
                   help="continue a stopped run from each expert's newest saved state (or, for its expert, the STATE "
                        "file given), and fail if there is none. Without it the same command also continues a run "
                        "that trains the same thing from its last state, and keeps a LoRA it already finished; "
                        "changes of how the run works (memory_mode, compile, save or validation cadences) are taken "
                        "on, changes of what it trains are refused by name")
    p.add_argument("--resume-from-hub", metavar="USER/NAME[@REVISION]",
                   help="continue a run from the newest training states in a Hugging Face repository (what [hub] "
                        "push_states or `wanpair push --states` put there): they are fetched into the run's state "
                        "folder, then the run continues as with --resume")
    p.add_argument("--gpus", type=_whole(1), metavar="N",
                   help="use N GPUs (default: all visible). With 2 or more the experts train side by side, one "
                        "GPU group each (see --experts-parallel); each group trains its expert data-parallel")
    p.add_argument("--experts-parallel", choices=("auto", "on", "off"),
                   help="train both experts at the same time (default: [train] experts_parallel, auto = when "
                        "2+ GPUs have room); off = one after the other, each on all GPUs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("timesteps", epilog=_guide("training"),
                       help="histogram of the timesteps an expert trains on, as configured",
                       description="Draw timesteps with the project's sampler and window (100 000 by default), "
                                   "print a text histogram, write a PNG (and the raw draws with --csv).")
    p.add_argument("project", help="the wanpair.toml project file")
    p.add_argument("--expert", choices=("high", "low"), help="which expert of a pair (a Wan 2.1 model: leave it out)")
    p.add_argument("-n", type=_whole(1), default=100_000, help="number of draws (default 100000)")
    p.add_argument("--png", help="where to write the plot (default: <output_dir>/<name>/timesteps_<expert>.png)")
    p.add_argument("--csv", action="store_true", help="also write the raw draws as CSV beside the plot")
    p.set_defaults(func=cmd_timesteps)

    p = sub.add_parser("inspect", epilog=_guide("sampling-export-merge"),
                       help="show a LoRA's expert, timestep window, rank, alpha, targets and metadata")
    p.add_argument("lora", nargs="+", help="LoRA files (any layout) or peft adapter folders, e.g. both of a pair")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", epilog=_guide("sampling-export-merge"),
                       help="convert a LoRA between musubi (ComfyUI), comfy, diffusers and peft layouts; "
                            "--workflow: a project's ComfyUI workflow",
                       description="Convert a Wan LoRA between layouts. musubi = lora_unet_*.lora_down/up + alpha "
                                   "(the default ComfyUI and diffusers load); comfy = diffusion_model.*.lora_A/B; "
                                   "diffusers = transformer.*.lora_A/B (alpha folded in); peft = adapter folder. "
                                   "Also reads Musubi-Tuner and ai-toolkit files. With --workflow and a project "
                                   "file instead: write its ComfyUI workflow (each LoRA on its expert, wanpair "
                                   "sample's settings), as training does at its end.")
    p.add_argument("lora", help="the LoRA to convert (with --workflow: the wanpair.toml project)")
    p.add_argument("--format", choices=("musubi", "comfy", "diffusers", "peft"), help="the layout to write (required "
                                                                                       "unless --workflow)")
    p.add_argument("--workflow", action="store_true",
                   help="write the project's ComfyUI workflow: <output_dir>/<name>_comfyui_workflow.json (or --out)")
    p.add_argument("--out", help="output path (default: <lora>_<format>.safetensors, or a folder for peft)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="convert weights to this dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge", epilog=_guide("sampling-export-merge"),
                       help="bake a LoRA into a base DiT file (same layout and dtype as the base)",
                       description="Write base + strength * LoRA as a new single-file checkpoint in the base's own "
                                   "key layout and dtype (fp8 bases are merged in fp32 and re-quantised), streaming "
                                   "one tensor at a time. Refuses a LoRA trained for the other expert.")
    p.add_argument("--base", required=True, help="the base expert file (.safetensors)")
    p.add_argument("--lora", required=True, help="the LoRA to merge")
    p.add_argument("--out", required=True, help="where to write the merged checkpoint")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength (default 1.0)")
    p.add_argument("--allow-expert-mismatch", action="store_true", help="merge even if the LoRA is for the other expert")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("push", epilog=_guide("sampling-export-merge"),
                       help="upload the finished pair, a model card and the samples to a Hugging Face repository",
                       description="Upload the project's finished LoRAs (as trained: the layout ComfyUI and diffusers "
                                   "load), a model card README.md that says which file goes on which expert and how "
                                   "to load the pair, the project's ComfyUI workflow if there is one, and the samples "
                                   "of <output_dir>/<name>/samples, in one commit to a Hugging Face model repository "
                                   "(created if it does not exist). A LoRA that is missing, partial or not this "
                                   "project's is refused before anything is uploaded. Needs a token with write "
                                   "access: HF_TOKEN or `hf auth login`. The card is also written beside the LoRAs, "
                                   "as <output_dir>/<name>_README.md.")
    p.add_argument("project", help="the wanpair.toml project whose pair to push")
    p.add_argument("--repo", metavar="USER/NAME", help="the model repository (default: [hub] repo of the project)")
    p.add_argument("--private", action="store_true",
                   help="create the repository private (an existing one keeps its visibility)")
    p.add_argument("--states", action="store_true",
                   help="also each expert's newest training state, for `wanpair train --resume-from-hub` on another "
                        "machine (large: ~0.9 GiB per 14B expert at rank 16)")
    p.add_argument("--dry-run", action="store_true",
                   help="write the model card beside the LoRAs and list what would be uploaded; upload nothing")
    p.set_defaults(func=cmd_push)

    from .sample import SampleSettings

    d = SampleSettings()
    p = sub.add_parser("sample", epilog=_guide("sampling-export-merge"),
                       help="generate with both experts and the LoRA pair (PNG for 1 frame, MP4 for video)",
                       description="Generate the way Wan 2.2 runs: the high-noise expert with the HighNoise LoRA "
                                   "for t >= 875 (I2V: 900), the low-noise expert with the LowNoise LoRA below. "
                                   "Defaults are Wan's: 40 steps and Wan's negative prompt; text to video: shift 12, "
                                   "guidance 4.0 (high) / 3.0 (low), 1 frame; image to video (an i2v-A14B project, "
                                   "--image required): shift 5, guidance 3.5 / 3.5, 81 frames. A Wan 2.1 model (t2v-14B, "
                                   "t2v-1.3B) runs alone with its LoRA: 50 steps, shift 5, guidance 5 (--lora, "
                                   "--strength, --guidance). Users of rank-16 pairs often prefer LoRA strengths of 0.5-0.8.")
    p.add_argument("project", help="the wanpair.toml project (models, and default LoRA paths)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--negative-prompt", dest="negative_prompt", help="default: Wan's own negative prompt")
    p.add_argument("--image", help="i2v-A14B projects: the first frame (scaled and centre-cropped to width x height)")
    p.add_argument("--width", type=int, help=f"default {d.width}")
    p.add_argument("--height", type=int, help=f"default {d.height}")
    p.add_argument("--frames", type=int, help=f"1 = image (PNG); 4k+1 = video (MP4); default {d.frames} (I2V: 81)")
    p.add_argument("--fps", type=_whole(1), help=f"video frame rate, default {d.fps}")
    p.add_argument("--steps", type=_whole(1), help=f"denoising steps, default {d.steps}")
    p.add_argument("--shift", type=float, help=f"flow shift of the sampler, default {d.shift} (I2V: 5.0)")
    p.add_argument("--guidance-high", dest="guidance_high", type=float, help=f"CFG scale on the high-noise expert, default {d.guidance_high} (I2V: 3.5)")
    p.add_argument("--guidance-low", dest="guidance_low", type=float, help=f"CFG scale on the low-noise expert, default {d.guidance_low} (I2V: 3.5)")
    p.add_argument("--guidance", type=float, help="CFG scale of a Wan 2.1 model (default 5.0); on a pair: both experts'")
    p.add_argument("--seed", type=int, help=f"seed of the first prompt (next prompts +1, +2, ...), default {d.seed}")
    p.add_argument("--strength-high", dest="strength_high", type=float, help="HighNoise LoRA strength, default 1.0")
    p.add_argument("--strength-low", dest="strength_low", type=float, help="LowNoise LoRA strength, default 1.0")
    p.add_argument("--lora-high", dest="lora_high", help="HighNoise LoRA (default: the project's output)")
    p.add_argument("--lora-low", dest="lora_low", help="LowNoise LoRA (default: the project's output)")
    p.add_argument("--strength", type=float, help="the strength of every LoRA (Wan 2.1: its one), default 1.0")
    p.add_argument("--lora", dest="lora_full", help="Wan 2.1: the LoRA (default: the project's output)")
    p.add_argument("--no-lora", action="store_true", help="sample the base models only, for comparison")
    p.add_argument("--allow-expert-mismatch", action="store_true", help="apply a LoRA even if it was trained for the other expert")
    p.add_argument("--out", help="output folder (default: <output_dir>/<name>/samples)")
    p.set_defaults(func=cmd_sample)
    return parser


_NOT_ALLOWED = "You may not write or read there: fix the folder's permissions, or choose another."
OS_ERROR_ADVICE = {
    errno.EROFS: "That folder is on a read-only file system: choose a writable one (output_dir, cache_directory, --out).",
    errno.EACCES: _NOT_ALLOWED, errno.EPERM: _NOT_ALLOWED,
    errno.ENOSPC: "The disk is full: free space, or choose a folder on another disk.",
}


def main(argv: list[str] | None = None) -> int:
    args = None
    try:  # the parser too: it imports the sampler's defaults, and a Ctrl-C there is a stop like any other
        args = build_parser().parse_args(argv)
        configure_logging(args.verbose)
        with warnings.catch_warnings():  # the libraries' deprecation chatter, for this command only
            if not args.verbose:
                warnings.filterwarnings("ignore", category=FutureWarning)
                warnings.filterwarnings("ignore", category=UserWarning)
            return args.func(args)
    except WanpairError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped reading (`wanpair doctor | head`): nothing left to say to it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- so that the interpreter's last flush stays quiet
        return 1
    except OSError as e:  # the file system refused (read-only, permissions, a full disk): its words, no traceback
        if args is not None and args.verbose:
            raise
        print(f"error: {e}. " + OS_ERROR_ADVICE.get(e.errno, "Run again with -v for the traceback."), file=sys.stderr)
        return 2
    except StopRequested as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
