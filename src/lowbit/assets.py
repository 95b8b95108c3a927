"""The packaged-asset finders' old address: they live in :mod:`lowbit.cli.assets`, beside the demo.

A thin re-export for code written against this path (scripts, branches started before the move):

>>> from lowbit.assets import smollm2_gguf   # same function as lowbit.cli.assets.smollm2_gguf
"""

from lowbit.cli.assets import AssetError, demo_text_files, demo_texts, minilm_dir, smollm2_gguf, wikitext

__all__ = ["AssetError", "demo_text_files", "demo_texts", "minilm_dir", "smollm2_gguf", "wikitext"]
