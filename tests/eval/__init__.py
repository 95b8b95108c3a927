"""Tests of lowbit.eval. Small offline builders shared by these tests (no hub, no downloads)."""

from __future__ import annotations

import copy
import random

import torch

WORDS = (
    "the of and in to a was is for on as with by he at from his an it that were which are first new one "
    "two game season city film also after had album river church year war team song series music band "
    "station school road line british army north south state world time early during later between"
).split()


def synthetic_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Reproducible pseudo-English: capitalised sentences of 6..14 words ending in ' .', in paragraphs."""
    rng = random.Random(seed)
    paras, cur = [], []
    for i in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        cur.append(" ".join([words[0].capitalize(), *words[1:]]) + " .")
        if i % 8 == 7:
            paras.append(" ".join(cur))
            cur = []
    return " = Heading = \n\n" + "\n\n".join(paras + [" ".join(cur)]) + "\n"


def word_tokenizer(bos: bool = False):
    """A word-level fast tokenizer over WORDS (+ capitalised forms, '.', specials); optional BOS template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[BOS]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + [w.capitalize() for w in WORDS] + ["."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")


def tiny_llama(vocab_size: int, seed: int = 0, tie: bool = True):
    """A random 2-block Llama small enough for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, initializer_range=0.2)  # peaked, not near-uniform, outputs
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(vocab_size: int, seed: int = 0):
    """A random 2-layer BertModel (no LM head)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, initializer_range=0.2)
    return BertModel(cfg, add_pooling_layer=False).eval()


def perturbed(model, scale: float = 0.05, seed: int = 1, name_filter: str = "mlp"):
    """A deep copy with relative Gaussian noise on the weights whose names contain ``name_filter``."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if name_filter in n and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    return m
