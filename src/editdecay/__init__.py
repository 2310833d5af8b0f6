"""editdecay: do knowledge edits survive fine-tuning?

Edit a causal LM (MEMIT, AlphaEdit), fine-tune it (full, LoRA, DoRA, selective
layers), and measure what is left of the edits (spec: docs/METHODS.md E1-E7).
"""

__version__ = "0.1.0"
