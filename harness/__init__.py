"""mmlora-harness: prove a fast multi-LoRA VLM path equals HF + PEFT, layer by layer, and time it."""

__version__ = "0.1.0"
