"""``qat``: quantization-aware training, started from any post-training method.

Each layer is first quantized by ``init`` (its statistics, transform and options are that method's); then
the runner trains every block whose layers use ``qat`` on their exact grids against the float model's block
outputs (:mod:`lowbit.qat.block`). The method itself is the starting quantization: what makes it train is the
declaration ``trains=True``, which the runner reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.methods.registry import LayerStats, MethodConfig, QuantResult, method_spec, register_method


@dataclass(frozen=True)
class QatOptions:
    init: str = field(default="gptq", metadata={"help": "the post-training method training starts from",
                                                "inherits": True})
    block_epochs: float = field(default=2.0, metadata={"help": "passes over the calibration windows per block (0: no "
                                                                 "block training, only the end-to-end step)"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate of the latent weights (Adam)"})
    scale_lr: float = field(default=1e-4, metadata={"help": "learning rate of scales, zero-points and mins"})
    batch_windows: int = field(default=2, metadata={"help": "calibration windows per training step"})
    val_windows: int = field(default=4, metadata={"help": "windows held out to judge each trained block"})
    seed: int = field(default=0, metadata={"help": "seed of the window order"})
    steps: int = field(default=0, metadata={"help": "end-to-end distillation steps after the blocks "
                                                    "(e2e_batch_windows windows each; 0: none): the grids (and at "
                                                    "e2e_weight_lr > 0 the weights) train against the float "
                                                    "model's next-token distribution"})
    e2e_lr: float = field(default=1e-3, metadata={"help": "learning rate of the end-to-end step (relative steps)"})
    e2e_weight_lr: float = field(default=3e-5, metadata={"help": "learning rate of the latent weights in the "
                                                                "end-to-end step (0: only the grids train there)"})
    e2e_dtype: str = field(default="auto", metadata={"help": "the end-to-end step's matrix products: float32 | "
                                                             "bfloat16 | auto (bfloat16 on CUDA and AMX CPUs)"})
    e2e_batch_windows: int = field(default=1, metadata={"help": "calibration windows per end-to-end step"})
    e2e_tail: bool = field(default=True, metadata={"help": "the teacher's tail beyond its top-k tokens as one more "
                                                           "category of the end-to-end KL (false: top-k terms only)"})
    topk: int = field(default=64, metadata={"help": "teacher tokens kept per position for the end-to-end KL"})
    loss: str = field(default="token", metadata={"help": "block loss: token (squared error relative to each token's "
                                                         "target) | mse"})

    def __post_init__(self) -> None:
        if self.e2e_dtype not in ("auto", "float32", "bfloat16"):
            raise LowbitError(f"qat: option 'e2e_dtype' must be one of auto, float32, bfloat16, got {self.e2e_dtype!r}")
        if self.e2e_batch_windows < 1:
            raise LowbitError(f"qat: option 'e2e_batch_windows' must be >= 1, got {self.e2e_batch_windows}")
        if self.e2e_weight_lr < 0 or self.lr < 0 or self.scale_lr < 0 or self.e2e_lr < 0:
            raise LowbitError("qat: learning rates (lr, scale_lr, e2e_lr, e2e_weight_lr) must be >= 0")


@register_method("qat", needs=("sq_mean",), options=QatOptions, trains=True)
def qat(weight: torch.Tensor, stats: LayerStats, scheme: Scheme, config: MethodConfig) -> QuantResult:
    """Quantization-aware training: block-wise reconstruction on the stored grid, from the init method's result."""
    base = method_spec("qat").inherited(config)
    assert base is not None
    spec, cfg = base
    return spec.fn(weight, stats, scheme, cfg)
