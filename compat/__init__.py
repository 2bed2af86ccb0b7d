"""The one shim for private and version-dependent PyTorch APIs; imports nothing of ours."""
