"""Data: tokenizer, input formats, preprocessing into indexed datasets, blends, the built-in
corpus, and the batches the training loop consumes."""
