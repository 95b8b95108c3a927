"""GPTQ's numbers before and after a refactor: run on two trees, compare the saved results bit for bit.

    PYTHONPATH=OLD/src python bench/gptq_identity.py old.pt
    PYTHONPATH=NEW/src python bench/gptq_identity.py new.pt
    python bench/gptq_identity.py --compare old.pt new.pt

One correlated 192 × 576 layer (affine schemes, both column orders) and one 96 × 512 layer (every GGML k- and
legacy type), seeded. A tree from before the one quantization system has GGML GPTQ in
``lowbit.io.gguf.gptq.gptq_blocks``; from it on, every layout goes through ``lowbit.methods.gptq.gptq_quantize``.
"""

from __future__ import annotations

import sys

import torch

AFFINE = ["int4-g128", "int4-g64", "int3-g64", "int4-g32-sym", "int8", "int2-g64", "nf4-g64", "fp8", "int4-ch",
          "int8-tensor"]
GGML = ["Q4_K", "Q6_K", "Q4_0", "Q3_K", "Q2_K", "Q5_K", "Q8_0", "Q5_1"]


def layer(rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, n, generator=g) @ (torch.eye(n) + torch.randn(n, n, generator=g) / 24)
    return torch.randn(rows, n, generator=g) * 0.05, x.T @ x


def run() -> dict[str, torch.Tensor]:
    from lowbit.core.scheme import parse_scheme
    from lowbit.methods.gptq import gptq_quantize

    out = {}
    w, xtx = layer(192, 576)
    for name in AFFINE:
        for ao in (True, False):
            out[f"{name}/act_order={ao}"] = gptq_quantize(w, xtx, 4096, parse_scheme(name), act_order=ao)[1]
    w, xtx = layer(96, 512)
    imp = xtx.diagonal() / 4096
    for name in GGML:
        try:
            from lowbit.io.gguf.blocks import BLOCK_TYPES
            from lowbit.io.gguf.gptq import gptq_blocks

            out[name] = gptq_blocks(w, BLOCK_TYPES[name], xtx, 4096, imp)[0].reshape(-1)
        except ImportError:
            out[name] = gptq_quantize(w, xtx, 4096, parse_scheme(name.lower()), importance=imp)[0].codes.reshape(-1)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "--compare":
        a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])
        same = [k for k in a if torch.equal(a[k], b[k])]
        print(f"{len(same)} of {len(a)} results bit-identical" + "".join(f"\n  differs: {k}" for k in a
                                                                       if k not in same))
    else:
        torch.save(run(), sys.argv[1])
