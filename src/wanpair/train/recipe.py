"""The LoRA-pair recipe: check -> cache -> train high-noise expert -> train low-noise expert -> save.

Stages are methods, in the order they run:
- `preflight`: every input validated before any model loads (project, dataset, weight files, and the
  classic mix-ups: a VAE where a DiT belongs, the low-noise file under `high_noise`, one file for both).
- `prepare_caches`: VAE latents and umT5 embeddings, content-keyed (see `wanpair.cache`); the VAE and
  text encoder are freed before training.
- `train_expert`: one expert, one LoRA. Same data, caches and settings for both experts; only the base
  file and the timestep window differ -- the two things the manual recipe asks users to keep straight.

Precision: the frozen base is held in the compute dtype (bf16) or, with `fp8_base`, its block
Linears are stored as float8_e4m3fn with a scale per row and multiplied in fp8 where the GPU can
(`wanpair.models.fp8`); LoRA weights and optimizer state stay fp32. How many blocks recompute their
activations, and whether some stream from host memory, is planned from the GPU's memory
(`wanpair.train.memory_plan`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import write_text_atomic
from ..cache import CacheStats, fill, folder_fingerprint, plan, read_entry
from ..data.dataset_config import load_dataset_config
from ..data.items import Item, check_dataset, require_clean
from ..errors import WanpairError
from ..models.dit import DitInfo, check_t2v_a14b, inspect_dit, load_dit
from ..models.files import inspect_weight_file
from ..models.fp8 import fp8_matmul_available, keep_transposed, to_fp8_linears, use_fp8_matmul
from ..models.kinds import identify
from ..models.text_encoder import TEXT_LEN, load_text_encoder, load_tokenizer
from ..models.vae import load_vae
from ..project import Project, TrainSettings
from .flow_matching import flow_matching_loss, pad_text
from ..export.formats import read_lora
from ..export.merge import check_expert
from .lora import DTYPES, add_lora, add_lora_dropouts, load_initial_lora, lora_state_dict, save_lora
from .metrics import MetricsLog, plot_loss
from .optim import build_optimizer, build_scheduler
from .memory_plan import MemoryPlan, plan_memory
from .speed import checkpoint_blocks, compile_blocks
from .streaming import stream_blocks
from .state import (StopFlag, StopRequested, capture_rngs, list_states, load_state, lora_params, restore_rngs,
                    run_lock, save_state)
from .metrics import drop_metrics_after
from .timesteps import sample_timesteps

log = logging.getLogger(__name__)

EXPERT_TITLE = {"high": "HighNoise", "low": "LowNoise"}


def prepare_expert(model, t: TrainSettings, compute_dtype: torch.dtype,
                   tokens: int = 0) -> tuple[list[torch.nn.Parameter], MemoryPlan]:
    """LoRA on, base frozen (fp8 if asked), speed levers and the memory plan for `tokens` tokens per
    batch applied; returns the trainable params and the plan."""
    device = next(model.parameters()).device
    if t.fp8_base:
        to_fp8_linears(model, compute_dtype)  # nothing left to do when load_dit(fp8=True) already did
    params = add_lora(model, t.rank, t.alpha, t.lora_dropout, t.include_modules, t.exclude_modules)
    add_lora_dropouts(model, t.rank_dropout, t.module_dropout)
    fp8_matmuls = use_fp8_matmul(model, t.fp8_matmul == "on" or (t.fp8_matmul == "auto" and fp8_matmul_available(device)))
    if t.compile == "on" or (t.compile == "auto" and device.type == "cuda"):
        compile_blocks(model)
    plan = plan_memory(model, tokens, t, device, sum(p.numel() * p.element_size() for p in params))
    if plan.transposed:
        keep_transposed(model)
    stream_blocks(model, plan.streamed)
    checkpoint_blocks(model, plan.checkpointed)
    log.info("fp8 matmuls in %d layers; %s", fp8_matmuls, plan.describe())
    return params, plan


def train_step(model, optimizer, scheduler, accelerator, params, x0, noise, t, text, compute_dtype,
               max_grad_norm: float, weighting: str = "none") -> tuple[torch.Tensor, bool]:
    """One micro-batch: loss, backward, and (when accumulation is complete) the optimizer step.

    Returns the loss and whether the update was applied. Non-finite gradients (a NaN/Inf loss makes
    them so) skip the update instead of poisoning the LoRA. Fused AdamW (the GPU default) takes the
    verdict as a device tensor and skips on the GPU, so the check costs no host sync in the middle
    of the step; other optimizers need one sync per optimizer step. In fp16 accelerate's loss
    scaler does this itself (and lowers the scale).
    """
    ok = True
    with accelerator.accumulate(model):
        loss = flow_matching_loss(model, x0, noise, t, text, compute_dtype, weighting)
        accelerator.backward(loss)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        on_device = inner.defaults.get("fused", False)
        check = accelerator.sync_gradients and accelerator.mixed_precision != "fp16"
        if check:
            grads = [p.grad for p in params if p.grad is not None]
            norms = torch._foreach_norm(grads) if grads else []  # one fused pass instead of a check per tensor
            finite = torch.stack([*norms, loss.detach()]).isfinite().all()
            if on_device:
                inner.found_inf = (~finite).float()
            else:
                ok = bool(finite)
        if ok:
            if max_grad_norm > 0 and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            if on_device and check:
                ok = bool(finite)  # the step is queued; this read waits for it, as the caller's loss.item() would
                inner.found_inf = None
            if ok:
                scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), ok


@dataclass
class ExpertResult:
    expert: str
    lora: Path
    steps: int
    seconds: float
    first_epoch_loss: float
    last_epoch_loss: float
    epoch_losses: list[float]


class LoraPairRecipe:
    def __init__(self, project: Project, overwrite: bool = False, allow_expert_mismatch: bool = False):
        self.p = project
        self.allow_expert_mismatch = allow_expert_mismatch
        self.t = project.train
        self.overwrite = overwrite
        self.items: list[Item] = []
        self.sampler = None
        self.dits: dict[str, DitInfo] = {}
        self.device = torch.device("cuda" if self.t.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if self.t.device == "auto" else self.t.device)

    # ---------------------------------------------------------------- preflight
    def preflight(self, experts: tuple[str, ...]) -> None:
        problems: list[str] = []
        if self.device.type == "cuda" and not torch.cuda.is_available():
            problems.append("[train] device = \"cuda\" but no CUDA GPU is visible; use device = \"auto\".")
        if self.device.type == "cpu" and self.t.mixed_precision == "fp16":
            problems.append("[train] mixed_precision = \"fp16\" needs a GPU; use \"bf16\" on the CPU.")
        if self.device.type == "cuda" and self.t.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
            problems.append(f"[train] mixed_precision = \"bf16\" but {torch.cuda.get_device_name()} has no bf16; "
                            "use \"fp16\" (the recipe's setting) on this GPU.")
        for expert in experts:
            out = self.p.lora_path(expert)
            if out.exists() and not self.overwrite:
                problems.append(f"{out} already exists; pass --overwrite to replace it, or change `name`.")
        for key, kind in (("vae", "vae"), ("t5", "t5")):
            path = getattr(self.p.models, key)
            try:
                if not path.is_dir():
                    identify(inspect_weight_file(path), expected=kind)
            except WanpairError as e:
                problems.append(f"[models] {key}: {e}")
        try:
            tokenizer = load_tokenizer(self.p.models.tokenizer)
        except WanpairError as e:
            problems.append(f"[models] tokenizer: {e}")
            tokenizer = None
        for expert in ("high", "low"):
            key = "high_noise" if expert == "high" else "low_noise"
            try:
                info = inspect_dit(self.p.dit_path(expert))
                check_t2v_a14b(info)
            except WanpairError as e:
                problems.append(f"[models] {key}: {e}")
                continue
            if info.expert and info.expert != expert:
                problems.append(
                    f"[models] {key} = {info.path} is named as the {info.expert}-noise expert. Swap high_noise and "
                    "low_noise: a LoRA trained on the wrong expert does nothing useful at inference."
                )
            self.dits[expert] = info
        for expert in experts:
            init = self.p.experts[expert].init_lora
            if init:
                try:
                    check_expert(read_lora(init), expert, f"the {expert}-noise expert being trained", self.allow_expert_mismatch)
                except WanpairError as e:
                    problems.append(f"[experts.{expert}] init_lora {init}: {e}")
        if len(self.dits) == 2 and self.dits["high"].fingerprint == self.dits["low"].fingerprint:
            problems.append(
                f"[models] high_noise and low_noise are the same file/content ({self.dits['high'].path}). Wan 2.2 "
                "needs both experts: wan2.2_t2v_high_noise_14B_*.safetensors and wan2.2_t2v_low_noise_14B_*.safetensors."
            )
        try:
            self.specs = load_dataset_config(self.p.dataset_config)
            report = check_dataset(self.specs, tokenizer)
            print(report.render())
            self.items = require_clean(report)
        except WanpairError as e:
            problems.append(str(e))
        problems += self._check_disk(experts)
        if problems:
            raise WanpairError("cannot start training:\n" + "\n".join(f"- {p}" for p in problems))

    def _check_disk(self, experts: tuple[str, ...]) -> list[str]:
        """Is the output folder writable, and is there room for caches, LoRAs and states? (an estimate)"""
        out = self.p.output_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
            tempfile.NamedTemporaryFile(dir=out).close()  # can we create (and remove) a file there?
        except OSError as e:
            return [f"output_dir {out} is not writable ({e}); choose another output_dir."]
        if not self.items or not self.dits:
            return []
        cfg = next(iter(self.dits.values())).config
        dim, ffn, blocks = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
        lora_params = blocks * self.t.rank * (8 * 2 * dim + 2 * (dim + ffn))
        lora_bytes = lora_params * (4 if self.t.save_dtype == "fp32" else 2)
        saves = 1 + (self.t.keep_last or (self.t.epochs if self.t.save_every_n_epochs or self.t.save_every_n_steps else 0))
        states = (self.t.keep_states or 10) if (self.t.save_state_every_n_steps or self.t.save_state_every_n_epochs) else 0
        cache = sum(16 * ((it.frames - 1) // 4 + 1) * (it.bucket[0] // 8) * (it.bucket[1] // 8) * 4
                    + TEXT_LEN * cfg["text_dim"] * 2 for it in self.items)
        need = cache + len(experts) * (saves * lora_bytes + states * lora_params * 4 * 3)
        free = shutil.disk_usage(out).free
        print(f"disk: about {need / 2**30:.2f} GiB needed for caches, LoRAs and states; {free / 2**30:.1f} GiB free in {out}")
        if need > free:
            return [f"not enough disk space in {out}: about {need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free."]
        return []

    # ---------------------------------------------------------------- caches
    def prepare_caches(self) -> CacheStats:
        m = self.p.models
        vae_fp, t5_fp, tok_fp = folder_fingerprint(m.vae), folder_fingerprint(m.t5), folder_fingerprint(m.tokenizer)
        self.cache_plan = plan(self.items, {s.index: s.cache_dir for s in self.specs}, vae_fp, t5_fp, tok_fp)
        vae_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        stats = fill(
            self.items, self.cache_plan,
            load_vae_fn=lambda: load_vae(m.vae, dtype=vae_dtype, device=self.device),
            load_text_fn=lambda: load_text_encoder(m.t5, m.tokenizer, dtype=vae_dtype, device=self.device),
        )
        print(f"cache: {stats}")
        return stats

    def _load_cached(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        latents = [read_entry(p) for p in self.cache_plan.latent_paths]
        texts = [read_entry(p) for p in self.cache_plan.text_paths]
        if any(x is None for x in latents + texts):
            raise WanpairError("a cache entry vanished or became unreadable during the run; run again to re-encode it.")
        return latents, texts

    def _sampler(self):
        """Prompts are encoded once, before training, so the text encoder is not kept around."""
        cfg = self.p.sample
        if not (cfg.every_n_epochs or cfg.every_n_steps):
            return None
        from ..sample import SampleSettings, TrainingSampler

        prompts = [x.strip() for x in cfg.prompts.read_text(encoding="utf-8").splitlines() if x.strip()]
        settings = SampleSettings(width=cfg.width, height=cfg.height, frames=cfg.frames, steps=cfg.steps, seed=cfg.seed)
        return TrainingSampler(self.p, prompts, settings, self.device, self.t.compute_dtype)

    # ---------------------------------------------------------------- training
    def _batches(self) -> list[list[int]]:
        """Item indices grouped into batches of one bucket each, num_repeats honoured."""
        batch_size = {s.index: s.batch_size for s in self.specs}
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(self.items):
            groups.setdefault((it.dataset, it.bucket, it.frames), []).extend([i] * it.num_repeats)
        return [idx[k:k + batch_size[ds]] for (ds, _, _), idx in sorted(groups.items())
                for k in range(0, len(idx), batch_size[ds])]

    def _metadata(self, expert: str, steps: int, epochs: int) -> dict[str, str]:
        t, window = self.t, self.p.experts[expert]
        title = self.p.lora_path(expert).stem
        info = self.dits[expert]
        dataset_fp = hashlib.sha256("".join(f"{it.content_hash}:{it.caption}" for it in self.items).encode()).hexdigest()[:16]
        timestep_range = f"{window.min_timestep},{window.max_timestep}"
        return {
            # modelspec.* / ss_* are the keys ComfyUI, A1111-style tools and Musubi-Tuner display.
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "wan2.2-t2v-a14b/lora",
            "modelspec.implementation": "https://github.com/Wan-Video/Wan2.2",
            "modelspec.title": title,
            "modelspec.author": self.p.author,
            "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "modelspec.timestep_range": timestep_range,
            "ss_network_module": "networks.lora_wan",
            "ss_network_dim": str(t.rank),
            "ss_network_alpha": str(t.alpha),
            "ss_base_model_version": "wan2.2_t2v_a14b",
            "ss_output_name": title,
            "ss_learning_rate": str(t.learning_rate),
            "ss_lr_scheduler": t.lr_scheduler,
            "ss_seed": str(t.seed),
            "ss_steps": str(steps),
            "ss_epoch": str(epochs),
            "ss_num_train_images": str(len(self.items)),
            "ss_mixed_precision": t.mixed_precision,
            "ss_min_timestep": str(window.min_timestep),
            "ss_max_timestep": str(window.max_timestep),
            "wanpair.version": __version__,
            "wanpair.architecture": "wan2.2-t2v-a14b",
            "wanpair.expert": expert,
            "wanpair.timestep_window": timestep_range,
            "wanpair.base_model": info.path.name,
            "wanpair.base_fingerprint": info.fingerprint,
            "wanpair.dataset_fingerprint": dataset_fp,
            "wanpair.settings": json.dumps(asdict(t), sort_keys=True),
        }

    @property
    def saves_states(self) -> bool:
        """States are written when asked for, and then also at every intermediate LoRA save."""
        return bool(self.t.save_state_every_n_steps or self.t.save_state_every_n_epochs)

    def _save(self, model, expert: str, step: int, epochs: int, out: Path) -> int:
        sd = lora_state_dict(model, self.t.alpha, DTYPES[self.t.save_dtype])
        save_lora(out, sd, self._metadata(expert, step, epochs))
        return len(sd) // 3

    def _save_intermediate(self, model, expert: str, step: int, epoch: int, kept: list[Path]) -> None:
        final = self.p.lora_path(expert)
        out = final.with_name(f"{final.stem}-step{step:06d}{final.suffix}")
        self._save(model, expert, step, epoch, out)
        kept.append(out)
        while self.t.keep_last and len(kept) > self.t.keep_last:
            kept.pop(0).unlink(missing_ok=True)

    def train_expert(self, expert: str, resume: dict | None = None) -> ExpertResult:
        t, window = self.t, self.p.experts[expert]
        compute_dtype = t.compute_dtype
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        latents, texts = self._load_cached()
        batches = self._batches()
        tokens = max(sum(math.prod(latents[i].shape[1:]) // 4 for i in idx) for idx in batches)  # 1x2x2 patches
        model = load_dit(self.dits[expert].path, dtype=compute_dtype, device=self.device, info=self.dits[expert],
                         fp8=t.fp8_base)
        try:
            params, _ = prepare_expert(model, t, compute_dtype, tokens)
        except WanpairError as e:  # the memory plan's verdicts are about this project's [train] settings
            raise WanpairError(f"{self.p.path}: {e}") from None
        if window.init_lora and resume is None:
            lora = read_lora(window.init_lora)
            check_expert(lora, expert, f"the {expert}-noise expert being trained", self.allow_expert_mismatch)
            print(f"continuing from {window.init_lora} ({load_initial_lora(model, lora, t.rank, t.alpha)} modules)")
        model.train()
        steps_per_epoch = math.ceil(len(batches) / t.gradient_accumulation_steps)
        total_steps = steps_per_epoch * t.epochs if not t.max_steps else min(t.max_steps, steps_per_epoch * t.epochs)
        epochs = math.ceil(total_steps / steps_per_epoch)
        optimizer = build_optimizer(params, t)
        scheduler = build_scheduler(optimizer, t, total_steps)
        # accelerate keeps one process-wide state; a second recipe in the same process (tests, scripts)
        # may use another precision, so start from a clean state each time.
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=self.device.type == "cpu",
                                  gradient_accumulation_steps=t.gradient_accumulation_steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        gen = torch.Generator().manual_seed(t.seed)
        step, first_epoch, first_pos, epoch_losses, losses, smoothed, kept = 0, 1, 0, [], [], None, []
        if resume:
            step, first_epoch, first_pos = resume["step"], resume["epoch"], resume["pos"]
            epoch_losses, losses, smoothed, kept = resume["epoch_losses"], resume["losses"], resume["smoothed"], [Path(k) for k in resume["kept"]]
            named = dict(accelerator.unwrap_model(model).named_parameters())
            with torch.no_grad():
                for name, value in resume["lora"].items():
                    named[name].copy_(value)
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            if accelerator.scaler is not None and resume.get("scaler"):
                accelerator.scaler.load_state_dict(resume["scaler"])
            restore_rngs(resume["rngs"], gen)
            drop_metrics_after(self.p.run_dir / "metrics.jsonl", expert, step)
            print(f"resuming the {expert}-noise expert at step {step} (epoch {first_epoch})")

        def snapshot(epoch: int, pos: int) -> dict:
            return {"expert": expert, "step": step, "epoch": epoch, "pos": pos, "settings": asdict(t),
                    "lora": lora_params(accelerator.unwrap_model(model)), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                    "rngs": capture_rngs(gen), "epoch_losses": epoch_losses, "losses": losses,
                    "smoothed": smoothed, "kept": [str(k) for k in kept]}

        metrics = MetricsLog(self.p.run_dir, expert, t.tensorboard)
        sample_cfg = self.p.sample

        def maybe_sample(every: int, count: int) -> None:
            if self.sampler and every and count % every == 0:
                self.sampler(accelerator.unwrap_model(model), expert, step, accelerator.autocast, metrics.writer)

        print(f"training the {expert}-noise expert ({self.dits[expert].path.name}) on timesteps "
              f"{window.min_timestep}-{window.max_timestep}: {len(self.items)} items, {epochs} epochs, {total_steps} steps")
        start = last = time.perf_counter()
        bad, samples = 0, 0
        bar = tqdm(total=total_steps, initial=step, desc=f"{expert}-noise", unit="step")
        with StopFlag() as stop:
            for epoch in range(first_epoch, epochs + 1):
                order = list(range(len(batches)))
                random.Random(t.seed * 100_003 + epoch).shuffle(order)  # new order per epoch, reproducible
                pos = first_pos if epoch == first_epoch else 0
                if epoch != first_epoch:
                    losses = []
                while pos < len(order) and step < total_steps:
                    idx = batches[order[pos]]
                    pos += 1
                    x0 = torch.stack([latents[i] for i in idx]).float()
                    text = pad_text([texts[i].float() for i in idx])
                    noise = torch.randn(x0.shape, generator=gen)
                    tt = sample_timesteps(len(idx), t.timestep_sampling, (window.min_timestep, window.max_timestep),
                                          shift=t.discrete_flow_shift, sigmoid_scale=t.sigmoid_scale,
                                          logit_mean=t.logit_mean, logit_std=t.logit_std,
                                          preserve_shape=t.preserve_distribution_shape, generator=gen)
                    dev = accelerator.device
                    loss, ok = train_step(model, optimizer, scheduler, accelerator, params, x0.to(dev), noise.to(dev),
                                          tt.to(dev), text.to(dev), compute_dtype, t.max_grad_norm, t.loss_weighting)
                    value = loss.item()
                    samples += len(idx)
                    if not accelerator.sync_gradients:
                        losses.append(value)
                        continue
                    if not ok:
                        bad += 1
                        print(f"step {step + 1}: non-finite loss or gradients ({value}); update skipped ({bad} in a row)")
                        if bad >= t.max_bad_steps:
                            raise WanpairError(
                                f"{bad} consecutive non-finite steps on the {expert}-noise expert; stopped without saving "
                                f"a broken LoRA. Likely causes: learning_rate {t.learning_rate} too high (try a third), "
                                + ("fp16 overflow (use mixed_precision = \"bf16\")." if t.mixed_precision == "fp16"
                                   else "or a corrupt cache entry (delete the cache folder and run again)."))
                        continue
                    bad = 0
                    losses.append(value)
                    step += 1
                    now = time.perf_counter()
                    smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
                    lr = scheduler.get_last_lr()[0]
                    metrics.log({"step": step, "epoch": epoch, "loss": value, "smoothed_loss": smoothed, "lr": lr,
                                 "timestep": float(1000 * tt[0]), "s_per_step": round(now - last, 4),
                                 "samples_per_s": round(samples / (now - last), 3)})
                    last, samples = now, 0
                    bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}")
                    bar.update()
                    lora_save = t.save_every_n_steps and step % t.save_every_n_steps == 0 and step < total_steps
                    if lora_save:
                        self._save_intermediate(accelerator.unwrap_model(model), expert, step, epoch, kept)
                    state_save = t.save_state_every_n_steps and step % t.save_state_every_n_steps == 0
                    if step < total_steps and (state_save or (lora_save and self.saves_states)):
                        save_state(self.p.run_dir, expert, snapshot(epoch, pos), t.keep_states)
                    maybe_sample(sample_cfg.every_n_steps, step)
                    if stop.signum:
                        bar.close()
                        metrics.close()
                        self._stop(accelerator.unwrap_model(model), expert, snapshot(epoch, pos), stop.signum)
                epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
                maybe_sample(sample_cfg.every_n_epochs, epoch)
                if step >= total_steps:
                    break
                lora_save = t.save_every_n_epochs and epoch % t.save_every_n_epochs == 0
                if lora_save:
                    self._save_intermediate(accelerator.unwrap_model(model), expert, step, epoch, kept)
                if (t.save_state_every_n_epochs and epoch % t.save_state_every_n_epochs == 0) or (lora_save and self.saves_states):
                    losses = []
                    save_state(self.p.run_dir, expert, snapshot(epoch + 1, 0), t.keep_states)
        bar.close()
        metrics.close()
        seconds = time.perf_counter() - start
        out = self.p.lora_path(expert)
        modules = self._save(accelerator.unwrap_model(model), expert, step, len(epoch_losses), out)
        print(f"saved {out}  ({modules} LoRA modules, {step} steps, {seconds:.1f} s; mean loss epoch 1 "
              f"{epoch_losses[0]:.4f} -> epoch {len(epoch_losses)} {epoch_losses[-1]:.4f})")
        return ExpertResult(expert, out, step, seconds, epoch_losses[0], epoch_losses[-1], epoch_losses)

    def _stop(self, model, expert: str, state: dict, signum: int) -> None:
        """Ctrl-C / SIGTERM: save the state and the LoRA so far (marked partial), then stop."""
        path = save_state(self.p.run_dir, expert, state, self.t.keep_states)
        final = self.p.lora_path(expert)
        partial = final.with_name(f"{final.stem}-partial-step{state['step']:06d}{final.suffix}")
        sd = lora_state_dict(model, self.t.alpha, DTYPES[self.t.save_dtype])
        save_lora(partial, sd, {**self._metadata(expert, state["step"], state["epoch"]), "wanpair.partial": "true"})
        raise StopRequested(
            f"stopped at step {state['step']} of the {expert}-noise expert; saved {partial.name} and the training "
            f"state {path}.\nResume with:  wanpair train {self.p.path} --resume", signum)

    # ---------------------------------------------------------------- the whole run
    def run(self, experts: tuple[str, ...] = ("high", "low"), resume: str | None = None) -> list[ExpertResult]:
        """The whole recipe. `resume`: a state file, or "latest" for the newest state of this run."""
        state = None
        if resume:
            states = list_states(self.p.run_dir)
            path = Path(resume) if resume != "latest" else (states[-1] if states else None)
            if path is None:
                raise WanpairError(f"no saved training state in {self.p.run_dir / 'state'}; set save_state_every_n_steps "
                                   "(or _epochs) in [train] so a run can be resumed.")
            state = load_state(path)
            if state["settings"] != asdict(self.t):
                changed = sorted(k for k, v in asdict(self.t).items() if state["settings"].get(k) != v)
                raise WanpairError(f"[train] settings changed since {path} was saved ({', '.join(changed)}); "
                                   "resuming would not continue the same run. Restore them or start over.")
            experts = tuple(e for e in experts if e == state["expert"] or (state["expert"] == "high" and e == "low"))
            print(f"resuming from {path}")
        with run_lock(self.p.output_dir, self.p.name):
            self.preflight(experts)
            self.prepare_caches()
            self.sampler = self._sampler()
            results = []
            for e in experts:
                results.append(self.train_expert(e, state if state and e == state["expert"] else None))
                gc.collect()  # the expert just trained is garbage now: free its memory before the next loads
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            print(f"loss plot: {plot_loss(self.p.run_dir / 'metrics.jsonl', self.p.run_dir / 'loss.png')}")
        summary = {"project": str(self.p.path), "name": self.p.name, "device": str(self.device),
                   "experts": [asdict(r) | {"lora": str(r.lora)} for r in results]}
        write_text_atomic(self.p.run_dir / "summary.json", json.dumps(summary, indent=2))
        return results
