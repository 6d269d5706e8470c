"""Everything a run writes for one expert, found by name: what a rerun continues, and what only
`--overwrite` removes.

One expert's run leaves, beside its final LoRA `<output_dir>/<LoRA name>.safetensors`:
intermediate LoRAs (`<LoRA name>-step<N>`), partial LoRAs saved on Ctrl-C (`<LoRA name>-partial-step<N>`),
training states (`<name>/state/<expert>-step<N>.pt`), samples (`<name>/samples/<expert>-step<N>_*`), its
TensorBoard events (`<name>/tensorboard/<expert>/`) and its rows in `<name>/metrics.jsonl`. A file is this
run's by its name as written here and, for a LoRA, by its metadata (`lora_output_name`); a run that starts
again without a state moves these aside (`set_aside`), only --overwrite removes them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import WanpairError
from ..models.files import safetensors_metadata
from ..project import Project
from .metrics import drop_metrics_after, read_metrics
from .state import list_states


def lora_output_name(path: Path) -> str | None:
    """The name of the final LoRA whose run wrote `path` (its `ss_output_name`), None when unreadable."""
    try:
        return safetensors_metadata(path).get("ss_output_name")
    except (OSError, WanpairError):
        return None


@dataclass
class ExpertOutputs:
    project: Project
    expert: str

    @property
    def final(self) -> Path:
        return self.project.lora_path(self.expert)

    def intermediate_loras(self) -> list[Path]:
        """`<LoRA name>-step<N>` files, by step."""
        return self._numbered(f"{self.final.stem}-step")

    def partial_loras(self) -> list[Path]:
        return self._numbered(f"{self.final.stem}-partial-step")

    def states(self) -> list[Path]:
        return list_states(self.project.run_dir, self.expert)

    def samples(self) -> list[Path]:
        return sorted((self.project.run_dir / "samples").glob(f"{self.expert}-step*"))

    @property
    def tensorboard(self) -> Path:
        return self.project.run_dir / "tensorboard" / self.expert

    def _numbered(self, prefix: str) -> list[Path]:
        """`<prefix><digits>` LoRAs that this run wrote: named so, and saying so in their metadata (the final
        LoRA's name as `ss_output_name`), so that project `X-step7`'s final LoRA, in the same folder as project
        `X`'s, is not taken for an intermediate of `X` (nor removed by its --overwrite)."""
        suffix = self.final.suffix
        found = [p for p in self.final.parent.glob(f"{prefix}*{suffix}")
                 if p.name[len(prefix):-len(suffix)].isdigit() and lora_output_name(p) == self.final.stem]
        return sorted(found, key=lambda p: int(p.name[len(prefix):-len(suffix)]))

    def earlier_work(self) -> list[Path]:
        """What an earlier run made that a user may want back: its states, intermediate and partial LoRAs,
        samples. (Metrics rows and TensorBoard events only describe a run: they go with it.)"""
        return [*self.states(), *self.intermediate_loras(), *self.partial_loras(), *self.samples()]

    def set_aside(self) -> tuple[Path, list[Path]]:
        """A run that left work but no state to continue from starts again: its intermediate and partial LoRAs,
        samples, TensorBoard events and metrics rows are moved (never deleted) to
        `<run_dir>/earlier/<expert>-<time>/`, for the user to keep or delete. Returns the folder and the files
        (where they were)."""
        run_dir = self.project.run_dir
        folder = run_dir / "earlier" / f"{self.expert}-{time.strftime('%Y%m%d-%H%M%S')}"
        while folder.exists():  # set aside twice within a second: a folder of its own
            folder = folder.with_name(folder.name + "+")
        work = self.earlier_work()
        for path in [*work, *([self.tensorboard] if self.tensorboard.exists() else [])]:
            dest = folder / (path.relative_to(run_dir) if path.is_relative_to(run_dir) else path.name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, dest)
        metrics = run_dir / "metrics.jsonl"
        rows = [r for r in read_metrics(metrics) if r.get("expert") == self.expert] if metrics.exists() else []
        if rows:
            write_text_atomic(folder / "metrics-rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        return folder, work

    def remove_all(self) -> int:
        """`--overwrite`: the final LoRA and everything listed above, metrics rows (the step-0 validation
        row too) and TensorBoard events; returns how many files went."""
        files = [self.final] if self.final.exists() else []
        files += self.earlier_work()
        for path in files:
            path.unlink(missing_ok=True)
        self.forget_metrics_after(0, including_start=True)
        return len(files)

    def forget_metrics_after(self, step: int, including_start: bool = False) -> None:
        """Metrics rows (and TensorBoard events) after `step`: a killed run's last steps, replaced by the
        continuation. `including_start`: also the rows of step 0 (the validation before training) and every
        event file, for a run that starts over."""
        drop_metrics_after(self.project.run_dir / "metrics.jsonl", self.expert, -1 if including_start else step)
        if including_start:
            shutil.rmtree(self.tensorboard, ignore_errors=True)


def describe(paths: list[Path], run_dir: Path) -> str:
    """'2 states, 3 intermediate LoRAs, ...' for a list of `ExpertOutputs` files."""
    kinds = {"state": 0, "intermediate LoRA": 0, "partial LoRA": 0, "sample": 0}
    for p in paths:
        kind = ("state" if p.suffix == ".pt" else "sample" if p.parent == run_dir / "samples"
                else "partial LoRA" if "-partial-step" in p.name else "intermediate LoRA")
        kinds[kind] += 1
    return ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in kinds.items() if n)
