"""Models: the native decoder, Hugging Face models, LoRA, and conversion between them."""
