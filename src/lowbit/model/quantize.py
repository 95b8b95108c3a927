"""Quantize a whole model following a resolved Plan, block by block.

``quantize_model(model, plan, calib)`` swaps every planned layer for a ``QLinear``/``QEmbedding``
and returns a :class:`QuantReport` (one row per layer). Data-free methods quantize a layer straight
from its weight; calibrated methods (GPTQ, AWQ, importance-weighted RTN) get their statistics from the
block-by-block runner in :mod:`lowbit.model.calibrate`.
"""

from __future__ import annotations

import copy
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.core.qtensor import QTensor
from lowbit.errors import LowbitError
from lowbit.kernels import use_kernels
from lowbit.layouts import layout_of
from lowbit.methods.registry import LayerStats, MethodSpec, get_method, method_names, method_spec
from lowbit.model.arch import ArchInfo, arch_for, blocks_of
from lowbit.model.calibrate import BlockInput, FloatPath, capture_block_inputs, collect_stats, run_block
from lowbit.model.convert import check_convertible, quantized_module
from lowbit.model.convert import weight_matrix as _weight_matrix
from lowbit.model.device import layer_on, optional_device, send, to_device
from lowbit.model.plan import LayerPlan, Plan, unsupported_leaf
from lowbit.model.qmodules import QLinear
from lowbit.model.report import LayerReport, QuantReport  # noqa: F401  (re-exported)
from lowbit.model.streaming import ATTR as STREAM_ATTR
from lowbit.model.streaming import StreamedWeights, streamed_weights

log = logging.getLogger(__name__)


def spec_of(lp: LayerPlan) -> MethodSpec:
    return method_spec(lp.method)


def act_scheme(lp: LayerPlan) -> str | None:
    """The layer's activation quantization: the ``act`` option, else what its method implies."""
    return lp.config.options.get("act") or spec_of(lp).act


def stats_needed(lp: LayerPlan) -> frozenset[str]:
    """The statistics calibration must collect for this layer (as its method declares them)."""
    return spec_of(lp).needs_for(lp.config) if lp.scheme is not None else frozenset()


def wants_float_target(lp: LayerPlan) -> bool:
    """The layer aims at the float model's outputs: its method needs the cross statistics, or trains its block
    against the float block's outputs."""
    return "cross" in stats_needed(lp) or (lp.scheme is not None and spec_of(lp).trains)


def trains(lp: LayerPlan) -> bool:
    return lp.scheme is not None and spec_of(lp).trains


def needs_data(lp: LayerPlan) -> bool:
    return lp.scheme is not None and (bool(stats_needed(lp)) or spec_of(lp).transform_for(lp.config) is not None
                                      or act_scheme(lp) == "int8-static")


def _stand_in(lp: LayerPlan) -> str:
    """The data-free method used when a calibrated layer saw no tokens: the declared fallback, where it can
    produce the layer's layout."""
    fb = spec_of(lp).fallback
    ok = fb in method_names() and lp.scheme is not None and lp.scheme.layout in method_spec(fb).layouts
    return fb if ok else "rtn"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_finite_weights(model: nn.Module, names: list[str]) -> None:
    for n in names:
        w = model.get_submodule(n).weight
        if w.is_meta:  # a streamed block, checked when it is loaded
            continue
        if not torch.isfinite(w).all():
            raise LowbitError(f"layer {n}: its weights hold NaN or Inf values; refusing to quantize")


class _Quantizer:
    def __init__(self, model: nn.Module, resolved: dict[str, LayerPlan], report: QuantReport):
        self.model = model
        self.resolved = resolved
        self.report = report
        # id(weight) -> (weak ref to it, name, qtensor, plan), to quantize tied weights once. Weak: in a
        # streamed model a replaced layer's weight is freed, and a later one may reuse its id
        self.by_param: dict[int, tuple[weakref.ref, str, QTensor, LayerPlan]] = {}
        self.latents: dict[str, torch.Tensor] = {}  # qat layers: the weights training starts from, until trained
        self.e2e_latents: dict[str, torch.Tensor] = {}  # ... and where qat's end-to-end step starts from
        for n, lp in resolved.items():
            if lp.scheme is not None:
                continue
            report.kept.append(n)

    def quantize_layer(self, name: str, stats: LayerStats) -> None:
        lp = self.resolved[name]
        assert lp.scheme is not None
        mod = self.model.get_submodule(name)
        pid = id(mod.weight)
        tied = self.by_param.get(pid)
        if tied is not None and tied[0]() is not mod.weight:
            tied = None
        t0 = time.perf_counter()
        note = lp.note  # e.g. the plan's fallback for a GGML type whose blocks do not fit the rows
        if tied is not None and tied[3].scheme == lp.scheme and tied[3].method == lp.method:
            q, res, note = tied[2], None, "tied"  # (the twin's row carries the plan's note)
        else:
            w = _weight_matrix(mod)
            method = lp.method
            if spec_of(lp).needs and stats.tokens == 0:
                method = _stand_in(lp)
                msg = f"saw no calibration tokens: {method} instead of {lp.method}"
                note = f"{note}; {msg}" if note else msg
                self.report.warnings.append(f"{name}: {msg}")
            try:
                res = get_method(method)(w, stats, lp.scheme, lp.config)
            except LowbitError as e:
                raise LowbitError(f"layer {name}: {e}") from None
            q = res.qtensor
            if spec_of(lp).trains:  # where training starts from: the weights the method rounded, or the float ones
                latent = res.info.get("latent")
                self.latents[name] = (w if latent is None else latent).detach().to(torch.float32).reshape(q.shape)
            if res.info.get("damp_raised"):
                msg = f"ill-conditioned Hessian, dampening raised to {res.info.get('damp')}"
                note = f"{note}; {msg}" if note else msg
                self.report.warnings.append(f"{name}: {msg}")
            if tied is not None:
                note = "; ".join(x for x in (note, "untied (different scheme from its tied twin)") if x)
            if tied is None:
                self.by_param[pid] = (weakref.ref(mod.weight), name, q, lp)
        new = quantized_module(name, mod, q)  # keeps bias, padding index, embedding scale; checked on a probe
        act = act_scheme(lp) if lp.kind == "linear" else None
        if act is not None:
            from lowbit.kernels import ACT_SCHEMES

            if act not in ACT_SCHEMES:
                raise LowbitError(f"layer {name}: unknown activation scheme {act!r} (known: {', '.join(ACT_SCHEMES)})")
            new.act_scheme = act
            if act == "int8-static":
                if stats.act_range is None:
                    raise LowbitError(f"layer {name}: int8-static activations need calibration statistics")
                new.act_scale = torch.tensor(stats.act_range / 127.0)
        rel = 0.0
        if note != "tied":
            w = _weight_matrix(mod).float()
            rel = float((q.dequantize(torch.float32) - w).norm() / w.norm().clamp(min=1e-30))
        _set_module(self.model, name, new)
        self.report.layers.append(LayerReport(
            name, lp.scheme.name, lp.method, q.bits_per_weight, q.numel, q.nbytes, rel,
            None if res is None else res.loss, time.perf_counter() - t0, note, lp.kind))


def quantize_model(model: nn.Module, plan: Plan, calib: torch.Tensor | None = None, *, batch_size: int = 8,
                   sample_rows: int = 4096, progress: bool | None = None,
                   on_block: Callable[[int, int], None] | None = None,
                   stats: dict[str, LayerStats] | None = None,
                   device: str | torch.device | None = None,
                   resume_dir: str | Path | None = None) -> QuantReport:
    """Quantize ``model`` in place following ``plan``; ``calib`` is a LongTensor of token windows (N, T).

    ``stats`` (layer name -> statistics, e.g. merged from other processes) stands in for calibration:
    each layer is quantized from its given statistics, without the block runner or pair transforms.

    A model loaded with ``lazy=True`` (blocks on meta, see :mod:`lowbit.model.streaming`) has each block's
    weights read right before the block is quantized, so one float block is in memory at a time; it comes
    out complete, like any other model.

    ``device`` (default: where the model is) is where the work runs: each block and its calibration
    activations (each layer, for data-free methods) go there to be quantized, then back to the model's device.

    ``resume_dir``: checkpoint each finished block there (:mod:`lowbit.model.resume`); a rerun of the same job
    (same model, plan, calibration, settings) restores the finished blocks instead of redoing them, with the
    same result. The folder stays after the run: remove it (``BlockCheckpoints.finish``) once the output is saved.

    >>> plan = Plan.default("int4-g128", "gptq", family="llama", embeddings=("model.embed_tokens",), head="lm_head")
    >>> report = quantize_model(model, plan, windows)   # windows: token ids (4, 32)
    >>> [(r.name, r.scheme, r.method) for r in report.layers][:2], report.calib_tokens
    ([('model.embed_tokens', 'int8', 'rtn'), ('model.layers.0.self_attn.q_proj', 'int4-g128', 'gptq')], 128)
    >>> type(model.model.layers[0].mlp.down_proj).__name__
    'QLinear'
    """
    with use_kernels("reference"):  # calibration runs the quantized layers exactly as their weights say
        return _quantize_model(model, plan, calib, batch_size, sample_rows, progress, on_block, stats, device,
                               resume_dir)


def _quantize_model(model, plan, calib, batch_size, sample_rows, progress, on_block, stats, device,
                    resume_dir=None) -> QuantReport:
    t_start = time.perf_counter()
    device = optional_device(device)
    resolved = plan.resolve(model)
    report = QuantReport()
    for n, m in model.named_modules():
        if unsupported_leaf(m):
            report.kept.append(n)
            hint = " (convolutions: act='int8-static', the full-integer path)" if isinstance(m, nn.Conv2d) else ""
            report.warnings.append(f"{n}: {type(m).__name__} is not supported{hint}; kept in float")
    planned = [n for n, lp in resolved.items() if lp.scheme is not None]
    for n in planned:  # before any calibration: a layer whose forward cannot be kept is refused up front
        check_convertible(n, model.get_submodule(n))
        _check_plan(n, resolved[n], model.get_submodule(n))
    check_finite_weights(model, planned)
    stream = streamed_weights(model)
    if stream is not None and stats is not None:  # no block runner: the whole model in now
        stream.load_all(model)
        delattr(model, STREAM_ATTR)
        stream = None
    q = _Quantizer(model, resolved, report)
    data_layers = [n for n in planned if needs_data(resolved[n])]
    resume = None
    if resume_dir is not None and data_layers and calib is not None:
        from lowbit.model.resume import BlockCheckpoints, fingerprint

        settings = {"batch_size": batch_size, "sample_rows": sample_rows, "device": str(device),
                    "stream": None if stream is None else stream.digest()}
        resume = BlockCheckpoints(resume_dir, fingerprint(model, plan.to_json(), calib, settings))
    e2e = _e2e_teacher(model, resolved, planned, calib, stream, report, batch_size, resume)
    if stats is not None and calib is None:
        for n in data_layers:
            q.quantize_layer(n, stats.get(n, LayerStats()))
        data_layers = []
    if data_layers:
        if calib is None:
            raise LowbitError(f"method {resolved[data_layers[0]].method} (layer {data_layers[0]}) needs calibration "
                              f"data: pass calibration text (--calib FILE)")
        info = arch_for(model)
        _quantize_blocks(model, info, resolved, q, calib, batch_size, sample_rows, progress, on_block, device,
                         resume)
        report.calib_windows, report.calib_tokens = int(calib.shape[0]), int(calib.numel())
    # Everything not handled block by block: data-free layers, and layers outside the blocks.
    done = {r.name for r in report.layers}
    rest = [n for n in planned if n not in done]
    if stream is not None and not data_layers:
        rest = _quantize_streamed(model, stream, rest, q, progress, on_block, device)
    for n in tqdm(rest, desc="quantize", disable=_no_bar(progress), leave=False):
        if needs_data(resolved[n]):
            report.warnings.append(f"{n}: outside the transformer blocks, no calibration statistics; "
                                   f"quantized data-free")
            q.resolved[n] = replace(resolved[n], method="rtn")
        with layer_on(model, n, device):
            q.quantize_layer(n, LayerStats())
    if stream is not None:
        stream.load_all(model)  # whatever no block loop reached (nothing, normally): the model is whole now
        delattr(model, STREAM_ATTR)
    if e2e is not None:
        _e2e_distill(model, e2e, calib, q, progress, resume)
    order = {n: i for i, n in enumerate(resolved)}
    report.layers.sort(key=lambda r: order[r.name])
    for pair, names in report.unfolded.items():  # one line per pair, not one per block
        report.warnings.append(f"{pair} cannot take a folded per-channel scale (shapes differ, e.g. grouped-query "
                               f"attention) in {len(names)} block(s), e.g. {names[0]}; not rescaled")
    report.seconds = time.perf_counter() - t_start
    return report


def _e2e_teacher(model: nn.Module, resolved: dict[str, LayerPlan], planned: list[str], calib: torch.Tensor | None,
                 stream: StreamedWeights | None, report: QuantReport, batch_size: int, resume=None):
    """For qat's end-to-end step (option ``steps`` > 0): the float model's top-k next-token log-probabilities on
    the calibration windows, taken now, before anything is quantized (or read from ``resume``, where an earlier
    run of this job saved them); with the layers and options to train."""
    names = [n for n in planned if trains(resolved[n]) and resolved[n].kind == "linear"]
    if not names or calib is None:
        return None
    _, o = spec_of(resolved[names[0]]).parse(resolved[names[0]].config)
    if o.steps <= 0:
        return None
    if stream is not None:
        report.warnings.append("qat end-to-end distillation needs the whole float model in memory (it is loaded "
                               "block by block here): skipped; load it with lazy=False")
        return None
    from lowbit.qat.e2e import DistillOptions, teacher_topk

    saved = None if resume is None else resume.teacher()
    if saved is not None and set(saved) == {"logp", "idx"} and saved["idx"].shape == (*calib.shape, o.topk):
        t_logp, t_idx = saved["logp"], saved["idx"]
    else:
        t_logp, t_idx = teacher_topk(model, calib, o.topk, batch_size=max(1, batch_size // 2))
        if resume is not None:
            resume.save_teacher({"logp": t_logp, "idx": t_idx})
    return names, (t_logp, t_idx), DistillOptions(o.steps, o.e2e_lr, o.topk, o.val_windows, o.seed,
                                                       o.e2e_weight_lr, o.e2e_dtype, o.e2e_batch_windows, o.e2e_tail)


def _e2e_distill(model: nn.Module, e2e, calib: torch.Tensor, q: _Quantizer, progress: bool | None,
                 resume=None) -> None:
    from lowbit.qat.e2e import distill

    names, teacher, opts = e2e
    report = q.report
    names = [n for n in names if n in q.e2e_latents and isinstance(model.get_submodule(n), QLinear)]  # block-trained
    if not names:
        return
    res = distill(model, names, calib, teacher, opts, latents=q.e2e_latents, progress=progress, resume=resume)
    q.e2e_latents.clear()
    report.notes.append(res.note())
    log.info("%s", res.note())


def _check_plan(name: str, lp: LayerPlan, mod: nn.Module) -> None:
    """The layer's method can produce its scheme's layout, its options are valid, its shape fits."""
    assert lp.scheme is not None
    try:
        spec = spec_of(lp)
        spec.check_layout(lp.scheme)
        spec.parse(lp.config)
        if not getattr(mod, "weight", torch.empty(0)).is_meta:
            layout_of(lp.scheme).check(lp.scheme, tuple(_weight_matrix(mod).shape))
    except LowbitError as e:
        raise LowbitError(f"layer {name}: {e}") from None


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _quantize_streamed(model: nn.Module, stream: StreamedWeights, names: list[str], q: _Quantizer,
                       progress: bool | None, on_block: Callable[[int, int], None] | None,
                       device: torch.device | None = None) -> list[str]:
    """Data-free layers of a streamed model, one block at a time: load the block, quantize its planned layers
    (the float weights go with the layers they replace), next block. Returns the layers outside the blocks."""
    for i in tqdm(range(len(stream.blocks)), desc="blocks", disable=_no_bar(progress)):
        prefix = stream.blocks[i]
        stream.load_block(model, prefix)
        mine = [n for n in names if n.startswith(prefix)]
        check_finite_weights(model, mine)
        for n in mine:
            with layer_on(model, n, device):
                q.quantize_layer(n, LayerStats())
        if on_block:
            on_block(i + 1, len(stream.blocks))
    return [n for n in names if not n.startswith(stream.blocks)]


def _quantize_blocks(model, info: ArchInfo, resolved, q: _Quantizer, calib, batch_size, sample_rows,
                     progress, on_block, device: torch.device | None = None, resume=None) -> None:
    blocks_name, blocks = blocks_of(model, info)
    stream = streamed_weights(model)
    inputs = to_device(capture_block_inputs(model, blocks[0], calib, batch_size), device)
    # Layers that aim at the float model's outputs need the float path's activations beside the quantized
    # path's: the float copy of each block runs on them, one block at a time.
    float_inputs = inputs if any(wants_float_target(lp) for lp in resolved.values()) else None
    use_shortcut = info.residual_last and resume is None  # a resumed run recomputes outputs: no shortcut, same bits
    bar = tqdm(range(len(blocks)), desc="blocks", disable=_no_bar(progress))
    for i in bar:
        block = blocks[i]
        prefix = f"{blocks_name}.{i}."
        mine = {n[len(prefix):]: n for n in resolved if n.startswith(prefix) and resolved[n].scheme is not None}
        if stream is not None:  # a lazily loaded model: this block's weights come in now
            stream.load_block(model, prefix)
            check_finite_weights(model, list(mine.values()))
        home = send(block, device)  # the block is quantized on the device, then goes back
        if resume is not None and resume.has(i):  # finished by an earlier run of this job
            float_block = copy.deepcopy(block) if float_inputs is not None else None
            _restore_block(block, i, mine, resolved, resume, q.report)
            q.e2e_latents.update(resume.latents(i))  # where qat's end-to-end step starts this block's layers
            inputs = run_block(block, inputs)
            for m in block.modules():
                if isinstance(m, QLinear):
                    m.drop_cache()
            send(block, home)
            if float_block is not None:
                float_inputs = run_block(float_block, float_inputs)
                del float_block
            if on_block:
                on_block(i + 1, len(blocks))
            continue
        _rescale_pairs(block, info, mine, resolved, inputs, q.report)
        float_block = copy.deepcopy(block) if float_inputs is not None else None
        groups = [tuple(g for g in grp if g in mine) for grp in info.sequential]
        leftover = tuple(r for r in mine if not any(r in grp for grp in groups))
        todo = [g for g in groups if g] + ([leftover] if leftover else [])
        shortcut = _residual_shortcut(info, todo, mine, resolved) if use_shortcut else None
        next_inputs = None
        for grp in todo:
            data = [r for r in grp if needs_data(resolved[mine[r]])]
            stats: dict[str, LayerStats] = {}
            if grp == (shortcut,):
                # The last layer adds into the block's output: one whole forward gives its statistics and the
                # block's output with it in float; its quantization error is added afterwards.
                assert shortcut is not None
                mod = block.get_submodule(shortcut)
                w_float = _weight_matrix(mod).float()
                outs: list[torch.Tensor] = []
                xs: dict[str, list[torch.Tensor]] = {mine[shortcut]: []}
                need = stats_needed(resolved[mine[shortcut]])
                stats = collect_stats(block, inputs, {mine[shortcut]: mod},
                                      {mine[shortcut]} if "xtx" in need else set(),
                                      sample_rows if "sample" in need else 0, outputs=outs, kept_inputs=xs)
                q.quantize_layer(mine[shortcut], stats.get(mine[shortcut], LayerStats()))
                qmod = block.get_submodule(shortcut)
                assert isinstance(qmod, QLinear)
                delta = (qmod.qweight.dequantize(torch.float32) - w_float).T  # (in, out)
                next_inputs = [BlockInput((o + (x.to(torch.float32) @ delta).to(o.dtype)).detach(), bi.kwargs,
                                          bi.first_window)
                               for o, x, bi in zip(outs, xs[mine[shortcut]], inputs, strict=True)]
                del outs, xs
                if i == 0:  # check the shortcut once against a real forward; fall back for good if it is off
                    real = run_block(block, inputs[:1])[0].hidden
                    err = float((real - next_inputs[0].hidden).norm() / real.norm().clamp(min=1e-30))
                    if err > 1e-4:
                        log.warning("block output shortcut off by %.2g for %s; using full forwards", err,
                                    info.family)
                        use_shortcut, next_inputs = False, None
                continue
            if data:
                want_xtx = {r for r in data if "xtx" in stats_needed(resolved[mine[r]])}
                rows = sample_rows if any("sample" in stats_needed(resolved[mine[r]]) for r in data) else 0
                layers = {mine[r]: block.get_submodule(r) for r in data}
                act_obs = {mine[r]: resolved[mine[r]].config.options.get("act_observer", "minmax") for r in data
                           if act_scheme(resolved[mine[r]]) == "int8-static"}
                fp = None
                if float_block is not None and any(wants_float_target(resolved[mine[r]]) for r in data):
                    assert float_inputs is not None
                    fp = FloatPath(float_block, float_inputs, {mine[r]: float_block.get_submodule(r) for r in data})
                stats = collect_stats(block, inputs, layers, {mine[r] for r in want_xtx}, rows,
                                      stop_after=layers, act_observers=act_obs, float_path=fp)
            for r in grp:
                q.quantize_layer(mine[r], stats.get(mine[r], LayerStats()))
                _cache(block.get_submodule(r))  # the block's later passes reuse the dequantized weight
        float_outputs = None
        if float_block is not None:
            assert float_inputs is not None
            float_outputs = run_block(float_block, float_inputs)
        to_train = [r for r in mine if trains(resolved[mine[r]])]
        if to_train:
            assert float_outputs is not None and float_block is not None
            _train_block(block, float_block, i, to_train, mine, resolved, inputs, float_outputs, q, progress)
        del float_block
        if resume is not None:
            names = set(mine.values())
            resume.save(i, block, [r for r in q.report.layers if r.name in names],
                        {r: {"act_scheme": getattr(block.get_submodule(r), "act_scheme", None),
                             "act_scale": getattr(block.get_submodule(r), "act_scale", None) is not None}
                         for r in mine}, {n: q.e2e_latents[n] for n in mine.values() if n in q.e2e_latents})
        inputs = next_inputs if next_inputs is not None else run_block(block, inputs)
        for m in block.modules():
            if isinstance(m, QLinear):
                m.drop_cache()
        send(block, home)
        if float_outputs is not None:
            float_inputs = float_outputs
        if on_block:
            on_block(i + 1, len(blocks))


def _restore_block(block: nn.Module, index: int, mine: dict[str, str], resolved: dict[str, LayerPlan], resume,
                   report: QuantReport) -> None:
    """Block ``index`` as an earlier run of this job finished it: its planned layers become quantized layers of
    their schemes (placeholders from RTN), then the checkpointed state replaces every tensor of the block."""
    state, rows, attrs = resume.load(index)
    for rel, name in mine.items():
        lp = resolved[name]
        assert lp.scheme is not None
        mod = block.get_submodule(rel)
        new = quantized_module(name, mod, layout_of(lp.scheme).quantize(_weight_matrix(mod).detach(), lp.scheme))
        a = attrs.get(rel, {})
        if isinstance(new, QLinear):
            new.act_scheme = a.get("act_scheme")
            if a.get("act_scale"):
                new.act_scale = torch.zeros(())
        _set_module(block, rel, new)
    try:
        block.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise LowbitError(f"resume: block {index}'s checkpoint does not fit the block ({str(e).splitlines()[0]}); "
                          f"delete {resume.folder} to start over") from None
    report.layers.extend(rows)


def _train_block(block: nn.Module, float_block: nn.Module, index: int, names: list[str], mine: dict[str, str],
                 resolved: dict[str, LayerPlan], inputs: list[BlockInput], targets: list[BlockInput],
                 q: _Quantizer, progress: bool | None) -> None:
    """Quantization-aware training of the block's ``names`` (their method declares ``trains``) against the float
    block's outputs; the layers' report rows get the block's losses."""
    from lowbit.qat.block import BlockTrainOptions, train_block

    lp = resolved[mine[names[0]]]
    _, o = spec_of(lp).parse(lp.config)
    opts = BlockTrainOptions(o.block_epochs, o.lr, o.scale_lr, o.batch_windows, o.val_windows, o.seed + index, o.loss)
    for r in names:
        mod = block.get_submodule(r)
        if isinstance(mod, QLinear):
            mod.drop_cache()
    if not all(isinstance(block.get_submodule(r), QLinear) for r in names):
        bad = next(r for r in names if not isinstance(block.get_submodule(r), QLinear))
        raise LowbitError(f"layer {mine[bad]}: qat trains linear layers only")
    latents = {r: q.latents.pop(mine[r], None) for r in names}
    if o.block_epochs <= 0:  # no block training: straight to the end-to-end step (if any) from the PTQ start
        if o.steps > 0:
            q.e2e_latents.update({mine[r]: t.cpu() for r, t in latents.items() if t is not None})
        return
    trained: dict[str, torch.Tensor] | None = {} if o.steps > 0 else None  # kept for the end-to-end step
    res = train_block(block, names, inputs, [t.hidden for t in targets], opts, label=f"qat block {index}",
                      progress=progress, latents=latents, trained_latents=trained)
    if trained is not None:
        q.e2e_latents.update({mine[r]: t.cpu() for r, t in trained.items()})
    rows = {r.name: r for r in q.report.layers}
    for r in names:
        row = rows.get(mine[r])
        if row is not None:
            row.note = "; ".join(x for x in (row.note, res.note()) if x)
            if res.kept:
                w = _weight_matrix(float_block.get_submodule(r)).float()
                wq = block.get_submodule(r).qweight.dequantize(torch.float32)
                row.rel_error = float((wq - w).norm() / w.norm().clamp(min=1e-30))
    log.info("block %d: %s", index, res.note())


def _cache(mod: nn.Module) -> None:
    if isinstance(mod, QLinear) and mod.act_scheme is None:
        mod.cache_weight(mod.qweight.dtype)


def _residual_shortcut(info: ArchInfo, todo: list[tuple[str, ...]], mine: dict[str, str],
                       resolved: dict[str, LayerPlan]) -> str | None:
    """The block-relative name of the last layer when the block's output can be had without another
    forward after it is quantized: the family says its output adds straight into the block's output, it is
    the last group, alone, and quantized from calibration statistics with weight-only quantization."""
    if not info.residual_last or not todo or len(todo[-1]) != 1 or todo[-1] != info.sequential[-1]:
        return None
    name = todo[-1][0]
    lp = resolved[mine[name]]
    if not needs_data(lp) or act_scheme(lp) is not None or lp.kind != "linear" or wants_float_target(lp):
        return None
    return name


def _rescale_pairs(block: nn.Module, info: ArchInfo, mine: dict[str, str], resolved: dict[str, LayerPlan],
                   inputs, report: QuantReport, sample_rows: int = 1024) -> None:
    """AWQ / SmoothQuant: search per-channel scales for each foldable (prev op → layers) pair and fold them."""
    from lowbit.methods.awq import search_scales
    from lowbit.methods.smoothquant import smooth_scales
    from lowbit.model.transforms import fold_scales

    pairs = []
    for prev, layers in info.scale_pairs:
        tf = [spec_of(resolved[mine[r]]).transform_for(resolved[mine[r]].config) if r in mine else None
              for r in layers]
        kinds = {None if t is None else t[0] for t in tf}
        if len(kinds) == 1 and None not in kinds:
            pairs.append((prev, layers, kinds.pop(), tf[0]))
    if not pairs:
        return
    firsts = {mine[layers[0]]: block.get_submodule(layers[0]) for _, layers, _, _ in pairs}
    stats = collect_stats(block, inputs, firsts, set(), sample_rows)
    for prev, layers, kind, (_, tspec, tconfig) in pairs:
        st = stats[mine[layers[0]]]
        mods = [block.get_submodule(r) for r in layers]
        weights = [_weight_matrix(m).float() for m in mods]
        lp = resolved[mine[layers[0]]]
        if st.tokens == 0 or st.sample is None:
            continue
        _, opts = tspec.parse(tconfig)
        if kind == "awq":
            s, info_ = search_scales(st.sample, weights, lp.scheme, opts.awq_grid)
            note = f"awq alpha {info_['alpha']:.2f}"
        else:
            s = smooth_scales(st.absmax, weights, opts.alpha)
            note = f"smoothquant alpha {opts.alpha}"
        if not fold_scales(block.get_submodule(prev), mods, s):
            report.unfolded.setdefault(f"{prev} -> {', '.join(layers)}", []).append(mine[layers[0]])
            continue
        log.info("%s: %s", mine[layers[0]], note)
