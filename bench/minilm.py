"""all-MiniLM-L6-v2: embedding cosine and nearest-neighbour agreement of quantized vs float.

    .venv/bin/python bench/minilm.py [--sentences 512]

Sentences are cut from the WikiText-2 test split; embeddings are mean-pooled (as sentence-transformers does).
"""

from __future__ import annotations

import argparse

import torch

import lowbit
from lowbit.cli.assets import minilm_dir, wikitext
from lowbit.eval.windows import read_text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = lowbit.load(minilm_dir())
    text = read_text(wikitext("test"))
    print(f"all-MiniLM-L6-v2 · {a.sentences} WikiText-2 test sentences · linear layers quantized, embeddings int8")
    print("| scheme | method | bpw (linear) | cosine mean | cosine min | NN agreement |")
    print("|---|---|---|---|---|---|")
    for scheme, method in (("int8", "rtn"), ("int4-g32", "rtn"), ("int4-g32", "hqq"), ("int4-g64-sym", "rtn")):
        q, rep = lowbit.quantize(model, tok, scheme=scheme, method=method, progress=False)
        r = lowbit.evaluate(q, reference=model, tokenizer=tok, text=text, sentences_n=a.sentences, speed=False,
                            progress=False)
        print(f"| {scheme} | {method} | {rep.linear_bpw:.3f} | {r.cos_mean:.5f} | {r.cos_min:.5f} | "
              f"{100 * r.nn_agreement:.1f}% |")


if __name__ == "__main__":
    main()
