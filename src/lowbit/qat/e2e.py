"""End-to-end distillation of the quantization parameters (EfficientQAT's E2E-QP, with the float model as teacher).

After the blocks are trained one by one, the whole quantized model trains its grids (scales, zero-points, GGML
super-scales and mins) and, at ``weight_lr`` > 0, the codes' latent weights too (straight through the rounding,
so codes move across grid points), so that its next-token distribution approaches the float model's: the loss is
the KL divergence from the teacher's distribution, taken on the teacher's ``topk`` most likely tokens per
position (their log-probabilities are all that is kept of the teacher: ``windows × tokens × topk`` numbers
instead of whole vocabularies). Windows held out from training decide whether the trained grids replace the
block-trained ones, so this step never makes the model worse on them.

The forward and backward passes of training may run in bfloat16 (``dtype``; ``auto`` takes it where the CPU
multiplies bfloat16 in hardware, AMX, or on CUDA): the fake weights and every trained parameter stay float32,
only the matrix products round their inputs. The held-out KL that decides what is kept is always float32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.qat.modules import QATLinear, swapped_in, train_steps

log = logging.getLogger(__name__)
CHECKPOINT_SECONDS = 300.0  # how often a resumable end-to-end step saves its state (and after its last step)


@dataclass(frozen=True)
class DistillOptions:
    steps: int  # optimizer steps, ``batch_windows`` windows each
    lr: float = 1e-3  # of the grids' θ (relative steps of the scales)
    topk: int = 64  # teacher tokens kept per position
    val_windows: int = 4
    seed: int = 0
    weight_lr: float = 0.0  # of the latent weights (0: they stay, only the grids move)
    dtype: str = "auto"  # of training's matrix products: float32 | bfloat16 | auto
    batch_windows: int = 1  # windows per step (the fake weights are built once per step, whatever the batch)
    tail: bool = True  # the teacher's tail beyond the top-k as one more category of the KL (topk_kl's rest)


@dataclass
class Distillation:
    kl_before: float  # held-out KL (top-k) to the teacher before this step
    kl_after: float
    kept: bool
    steps: int
    seconds: float

    def note(self) -> str:
        verdict = "kept" if self.kept else "block-trained grids kept (distillation did not lower it)"
        return (f"qat end-to-end: held-out KL(top-k) {self.kl_before:.4g} -> {self.kl_after:.4g}, {self.steps} steps, "
                f"{verdict}")


def compute_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype training's matrix products run in: ``float32``, ``bfloat16``, or ``auto`` (bfloat16 on CUDA and on
    a CPU with AMX, whose bfloat16 products are several times float32's; float32 elsewhere, where bfloat16 is
    emulated and slower)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise LowbitError(f"qat option e2e_dtype: {name!r} is not one of auto, float32, bfloat16")
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() == "AVX512" and _cpu_has("amx_bf16") \
        else torch.float32


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split()
    except OSError:
        pass
    return False


def _trained(qat: dict[str, QATLinear]) -> dict[str, torch.Tensor]:
    """What training changes: each layer's latent weight and grid parameters, ``layer.{name}.{param}``."""
    return {f"layer.{nm}.{k}": p.detach() for nm, m in qat.items() for k, p in m.named_parameters()}


def _load_trained(qat: dict[str, QATLinear], saved: dict[str, torch.Tensor]) -> None:
    want = _trained(qat)
    if set(want) - set(saved):
        raise LowbitError(f"resume: the end-to-end checkpoint lacks {sorted(set(want) - set(saved))[0]}; delete the "
                          f"resume folder to start over")
    with torch.no_grad():
        for nm, m in qat.items():
            for k, p in m.named_parameters():
                v = saved[f"layer.{nm}.{k}"]
                if v.shape != p.shape:
                    raise LowbitError(f"resume: the end-to-end checkpoint's {nm}.{k} has shape {tuple(v.shape)}, "
                                      f"not {tuple(p.shape)}; delete the resume folder to start over")
                p.copy_(v)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


@torch.no_grad()
def teacher_topk(model: nn.Module, windows: torch.Tensor, k: int, batch_size: int = 4
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float model's ``k`` most likely next tokens at every position of ``windows`` ``(N, T)``: their
    log-probabilities (float32) and ids, each ``(N, T, k)``."""
    vals, idx = [], []
    for i in range(0, windows.shape[0], batch_size):
        lp = _logits(model, windows[i:i + batch_size]).float().log_softmax(-1)
        v, j = lp.topk(k, dim=-1)
        vals.append(v)
        idx.append(j)
    return torch.cat(vals), torch.cat(idx)


def topk_kl(logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, rest: bool = True) -> torch.Tensor:
    """Per-position KL of the student's ``logits`` ``(…, V)`` from the teacher's top-k log-probabilities ``t_logp``
    at ``t_idx`` ``(…, k)``: ``Σ_top-k p (log p − log q)`` plus, with ``rest``, the tail beyond the top-k as one more
    category, ``p_r log(p_r / q_r)`` with ``p_r = 1 − Σ_top-k p``, ``q_r = 1 − Σ_top-k q``. That is the exact KL
    between the two distributions with the tail lumped together (≥ 0, ≤ the full KL); without it a student can
    lower the loss by taking mass from the tokens outside the teacher's top-k, which the full KL counts."""
    logq = logits.float().log_softmax(-1).gather(-1, t_idx)
    p = t_logp.exp()
    kl = (p * (t_logp - logq)).sum(-1)
    if not rest:
        return kl
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    log_q_rest = torch.log1p(-logq.exp().sum(-1).clamp(max=1 - 1e-7))
    return kl + torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest


def _kl(model: nn.Module, windows: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor], rows: Sequence[int],
        rest: bool = True) -> float:
    with torch.no_grad():
        kls = [float(topk_kl(_logits(model, windows[r:r + 1]), teacher[0][r:r + 1], teacher[1][r:r + 1], rest).mean())
               for r in rows]
    return sum(kls) / max(1, len(kls))


def distill(model: nn.Module, names: Sequence[str], windows: torch.Tensor,
            teacher: tuple[torch.Tensor, torch.Tensor], opts: DistillOptions, *,
            latents: dict[str, torch.Tensor] | None = None, progress: bool | None = None,
            resume=None) -> Distillation:
    """Train the grids of the quantized linear layers ``names`` of ``model`` against ``teacher`` (from
    :func:`teacher_topk` on the same ``windows``); they end as ``QLinear`` again.

    ``latents``: each layer's latent weight (from block training, or the float weight), held fixed while the
    grid moves, so codes change as scales do (weights exactly on their grid points would give the scales no
    gradient); default the quantized weight itself.

    ``resume`` (a :class:`lowbit.model.resume.BlockCheckpoints` of this job): the training state is saved there
    every ``CHECKPOINT_SECONDS`` and after the last step, and a run that finds one continues from it."""
    t0 = time.perf_counter()
    n = windows.shape[0]
    n_val = min(opts.val_windows, n // 4)
    val = list(range(n - n_val, n)) if n_val else list(range(n))
    train = list(range(n - n_val)) if n_val else list(range(n))
    before = _kl(model, windows, teacher, val, opts.tail)
    originals = {nm: model.get_submodule(nm) for nm in names}
    latents = latents or {}
    qat = {nm: QATLinear(m.qweight, latents[nm] if nm in latents else m.qweight.dequantize(torch.float32), m.bias)
           for nm, m in originals.items()}
    for m in qat.values():
        m.weight.requires_grad_(opts.weight_lr > 0)  # at 0 the codes' latent weights stay: only the grids move
    steps = max(1, opts.steps)
    dtype = compute_dtype(opts.dtype, windows.device)
    with swapped_in(model, originals, qat):
        groups = [{"params": [p for m in qat.values() for p in m.grid_params()], "lr": opts.lr}]
        if opts.weight_lr > 0:
            groups.append({"params": [m.weight for m in qat.values()], "lr": opts.weight_lr})

        b = max(1, opts.batch_windows)
        batches = [torch.tensor(train[i:i + b]) for i in range(0, len(train), b)]

        def loss_of(i: int) -> torch.Tensor:
            rows = batches[i]
            with torch.autocast(windows.device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = _logits(model, windows[rows])
            return topk_kl(logits, teacher[0][rows], teacher[1][rows], opts.tail).mean()

        start, adam, save = 0, None, None
        if resume is not None:
            done = resume.e2e()
            if done is not None:
                start, saved = done
                _load_trained(qat, saved)
                adam = {k: v for k, v in saved.items() if k.startswith("adam.")}
                log.info("qat end-to-end: resuming after step %d of %d", start, steps)

            def save(step: int, adam_state: dict[str, torch.Tensor]) -> None:
                resume.save_e2e(step, {**_trained(qat), **adam_state})

        train_steps(groups, steps, len(batches), loss_of, seed=opts.seed, label="qat end-to-end", every=4,
                    postfix="kl", progress=progress, start=min(start, steps), adam=adam, on_checkpoint=save,
                    checkpoint_seconds=CHECKPOINT_SECONDS)
        after = _kl(model, windows, teacher, val, opts.tail)
        kept = bool(after < before)
        if kept:
            for nm, m in qat.items():
                originals[nm].qweight = m.to_qtensor()
    return Distillation(before, after, kept, steps, time.perf_counter() - t0)
