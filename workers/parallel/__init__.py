"""One module per parallelism; each exposes ``build(cfg, rank, model, device)``."""
