"""The truth: Hugging Face transformers + PEFT, run eagerly. Never imports the runtime."""
