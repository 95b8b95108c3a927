"""Layer 5: loading models, the lowbit checkpoint, exporters."""
