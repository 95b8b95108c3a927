"""Resumable block-by-block runs: each finished block is checkpointed, a rerun of the same job starts after it.

A checkpoint folder holds ``run.json`` (a fingerprint of the job: the model's configuration, every tensor's name,
shape and dtype with a digest of its first MiB, the weights files' sizes and times for a streamed model, the
plan, the calibration windows, the runner's settings, lowbit's version) and, per finished block,
``block-NNNN.safetensors`` (the block's whole state: quantized parts, rescaled norms) with
``block-NNNN.json`` (its layers' report rows and attributes). Files are written atomically, the JSON last,
so a run killed mid-write leaves the block unfinished, never half-restored. A folder whose fingerprint
differs from the job's (another command, other data) is cleared, not resumed: resuming only ever skips work
whose result would have been identical (the runner is deterministic).
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
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.io.atomic import atomic_file
from lowbit.model.report import LayerReport

log = logging.getLogger(__name__)
FORMAT = 1


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

    def save(self, i: int, block: nn.Module, rows: list[LayerReport], attrs: dict[str, dict[str, Any]]) -> None:
        st, js = self._paths(i)
        state = {k: v.detach().contiguous().clone() for k, v in block.state_dict().items() if v is not None}
        with atomic_file(st) as tmp:
            save_file(state, str(tmp))
        with atomic_file(js) as tmp:  # written last: its presence says the block is complete
            tmp.write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "attrs": attrs}))

    def load(self, i: int) -> tuple[dict[str, torch.Tensor], list[LayerReport], dict[str, dict[str, Any]]]:
        st, js = self._paths(i)
        doc = json.loads(js.read_text())
        return load_file(str(st)), [LayerReport(**r) for r in doc["rows"]], doc["attrs"]

    def finish(self) -> None:
        """The job is done: its checkpoints go."""
        shutil.rmtree(self.folder, ignore_errors=True)
