"""lowbit's own runtime: prefill, decode and ``generate`` for Llama-family causal LMs, float or quantized
(:mod:`lowbit.runtime.decoder`)."""

from lowbit.runtime.decoder import MODEL_TYPES, Decoder, Linears, generate, unsupported

__all__ = ["MODEL_TYPES", "Decoder", "Linears", "generate", "unsupported"]
