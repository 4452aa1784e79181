"""Tokenizers: training (byte-level BPE, SentencePiece), loading and saving in Hugging Face format."""
