"""The canonical model: config + weights (loaders/) and the reference PyTorch model (reference.py)."""
