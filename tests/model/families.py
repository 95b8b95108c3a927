"""Tiny models of every family in the architecture table, with each family's real quirks switched on.

Gemma: hidden 64, so ``*ScaledWordEmbedding`` multiplies rows by √64 = 8; logit soft-capping; tied head;
sliding-window layers shorter than the test windows. Qwen2: q/k/v biases (random, not the zeros of init).
Phi-3: fused qkv / gate_up, a padding index. GPT-2: Conv1D, position embeddings, tied head. BERT: token
type and position embeddings, padding index, LayerNorms. Weights are drawn wide enough (std 0.1, norms
1 ± 0.2) that next-token distributions are far from uniform, so a dropped scale or bias shows in the KL.
"""

from __future__ import annotations

import torch
import transformers

from lowbit.eval.metrics import kl_divergence, log_probs

VOCAB = 272
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15)
GEMMA = dict(head_dim=16, final_logit_softcapping=30.0, tie_word_embeddings=True, sliding_window=8,
             query_pre_attn_scalar=16, pad_token_id=0, hidden_activation="gelu_pytorch_tanh")
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(GEMMA, attn_logit_softcapping=50.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(GEMMA, layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=128,
                                                    vocab_size=VOCAB, initializer_range=0.15)),
    "bert": ("BertConfig", "BertModel", dict(pad_token_id=0)),
}
DECODERS = [f for f in FAMILIES if f != "bert"]


def build(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg_name, model_name, extra = FAMILIES[family]
    kw = {} if family == "gpt2" else dict(COMMON)
    if family == "bert":
        kw.pop("num_key_value_heads")
    kw.update(extra)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower() or n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                # Gemma's RMSNorm computes x * (1 + w): w near 0 there, near 1 elsewhere
                p.copy_((0.0 if family.startswith("gemma") else 1.0) + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.copy_(0.1 * torch.randn_like(p))
        emb = model.get_input_embeddings()
        if emb.padding_idx is not None:
            emb.weight[emb.padding_idx].zero_()
    return model


def random_ids(n: int = 4, t: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    ids[:, 3] = 0  # the padding index appears too
    return ids


@torch.no_grad()
def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def mean_kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Mean KL(ref ‖ got) per token of two logit tensors (..., vocab)."""
    return float(kl_divergence(log_probs(ref.reshape(-1, ref.shape[-1])),
                               log_probs(got.reshape(-1, got.shape[-1]))).mean())


def rel_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def table(schemes: tuple[str, ...] = ("int8", "int4-g32")) -> list[str]:
    """Per family, int8 and int4 mean KL (BERT: relative error) of the every-layer RTN model to float."""
    from lowbit.model.plan import Plan, Rule
    from lowbit.model.quantize import quantize_model

    ids, rows = random_ids(), []
    for family in FAMILIES:
        cells = []
        for scheme in schemes:
            model = build(family)
            ref = outputs(model, ids)
            quantize_model(model, Plan((Rule("*", scheme),)), progress=False)
            metric = rel_error if family == "bert" else mean_kl
            cells.append(f"{scheme} {'rel' if family == 'bert' else 'KL'} {metric(ref, outputs(model, ids)):.2e}")
        rows.append(f"{family:12s} " + "  ".join(cells))
    return rows


if __name__ == "__main__":  # python -m tests.model.families
    import logging

    logging.disable(logging.WARNING)
    print("\n".join(table()))
