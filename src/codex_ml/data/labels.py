"""The label convention of every training row: which positions are trained on.

Rows are built here in ``data/`` (packing, SFT masks, FIM), and the losses in ``models/loss.py``
read them; the one definition lives at the lowest layer that writes it.
"""

IGNORE_INDEX = -100  # a label that is not trained on (prompt, padding, document boundary); PyTorch's default
