"""Resumable block-by-block runs: each finished block is checkpointed, a rerun of the same job starts after it.

A checkpoint folder holds ``run.json`` (a fingerprint of the job: the model's configuration, every tensor's name,
shape and dtype with a digest of its first MiB, the weights files' sizes and times for a streamed model, the
plan, the calibration windows, the runner's settings, lowbit's version) and, per finished block,
``block-NNNN.safetensors`` (the block's whole state: quantized parts, rescaled norms) with
``block-NNNN.json`` (its layers' report rows and attributes) and, for qat's end-to-end step, the block's latent
weights (``block-NNNN.latents.safetensors``). That step keeps the float teacher's top-k
(``teacher.safetensors``) and, every few minutes of training, its state (``e2e.safetensors``: the layers'
trained tensors, Adam's moments, the step reached in its header). Files are written atomically, the JSON last,
so a run killed mid-write leaves the block (or the step) unfinished, never half-restored; a damaged file is a
one-line error naming it. A folder whose fingerprint differs from the job's (another command, other data) is
cleared, not resumed: resuming only ever skips work whose result would have been identical (the runner is
deterministic).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_file
from lowbit.model.report import LayerReport

log = logging.getLogger(__name__)
FORMAT = 1


def folder_beside(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its checkpoints: beside it, hidden (``.NAME.resume``); the writer removes
    it once ``out`` is written."""
    p = Path(out)
    return p.with_name(f".{p.name}.resume")


def fingerprint(model: nn.Module, plan_json: str, calib: torch.Tensor, settings: dict[str, Any]) -> str:
    """A digest of everything a block's result depends on."""
    from lowbit import __version__

    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    h.update((cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else type(model).__name__).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if not t.is_meta:  # a streamed model's blocks are read later; their files' digests stand in (settings)
            h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()[: 1 << 20])
    h.update(plan_json.encode())
    h.update(calib.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(f"lowbit {__version__} resume {FORMAT}".encode())
    return h.hexdigest()


def _read(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors; a damaged one (truncated, bytes flipped) is a one-line error, not a traceback."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header or short data
        raise LowbitError(f"resume: {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"delete {path.parent} to start over") from None


class BlockCheckpoints:
    """The checkpoints of one job in ``folder`` (created; cleared first when it holds another job's)."""

    def __init__(self, folder: str | Path, digest: str):
        self.folder = Path(folder)
        run = self.folder / "run.json"
        old = None
        if run.exists():
            try:
                old = json.loads(run.read_text()).get("fingerprint")
            except (OSError, ValueError):
                old = None
        if old != digest and self.folder.exists():
            log.warning("%s holds checkpoints of another job; starting over", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if old != digest:
            with atomic_file(run) as tmp:
                tmp.write_text(json.dumps({"fingerprint": digest, "format": FORMAT}))

    def _paths(self, i: int) -> tuple[Path, Path]:
        return self.folder / f"block-{i:04d}.safetensors", self.folder / f"block-{i:04d}.json"

    def has(self, i: int) -> bool:
        st, js = self._paths(i)
        return st.exists() and js.exists()

    def save(self, i: int, block: nn.Module, rows: list[LayerReport], attrs: dict[str, dict[str, Any]],
             latents: dict[str, torch.Tensor] | None = None) -> None:
        st, js = self._paths(i)
        state = {k: v.detach().contiguous().clone() for k, v in block.state_dict().items() if v is not None}
        with atomic_file(st) as tmp:
            save_file(state, str(tmp))
        lat = st.with_suffix(".latents.safetensors")
        if latents:
            with atomic_file(lat) as tmp:
                save_file({k: v.detach().contiguous() for k, v in latents.items()}, str(tmp))
        elif lat.exists():
            lat.unlink()
        with atomic_file(js) as tmp:  # written last: its presence says the block is complete
            tmp.write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "attrs": attrs}))

    def load(self, i: int) -> tuple[dict[str, torch.Tensor], list[LayerReport], dict[str, dict[str, Any]]]:
        st, js = self._paths(i)
        try:
            doc = json.loads(js.read_text())
            rows, attrs = [LayerReport(**r) for r in doc["rows"]], doc["attrs"]
        except (ValueError, KeyError, TypeError) as e:
            raise LowbitError(f"resume: {js} is unreadable ({type(e).__name__}); delete {self.folder} to start over") \
                from None
        return _read(st), rows, attrs

    def latents(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s latent weights for qat's end-to-end step (empty when it kept none)."""
        lat = self._paths(i)[0].with_suffix(".latents.safetensors")
        return _read(lat) if lat.exists() else {}

    def save_teacher(self, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_file(self.folder / "teacher.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))

    def teacher(self) -> dict[str, torch.Tensor] | None:
        """The float teacher's top-k that an earlier run of this job saved, or None."""
        p = self.folder / "teacher.safetensors"
        return _read(p) if p.exists() else None

    def save_e2e(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """qat's end-to-end step after ``step`` optimizer steps: one file, the step in its header (one rename
        replaces both)."""
        with atomic_file(self.folder / "e2e.safetensors") as tmp:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"step": str(step)})

    def e2e(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(steps done, tensors) of the end-to-end step an earlier run of this job checkpointed, or None."""
        st = self.folder / "e2e.safetensors"
        if not st.exists():
            return None
        try:
            with safe_open(str(st), framework="pt") as f:
                step = int((f.metadata() or {})["step"])
        except Exception as e:  # a bad header, no step in it
            raise LowbitError(f"resume: {st} is unreadable ({type(e).__name__}); delete {self.folder} to start over") \
                from None
        return step, _read(st)

    def finish(self) -> None:
        """The job is done: its checkpoints go."""
        shutil.rmtree(self.folder, ignore_errors=True)
