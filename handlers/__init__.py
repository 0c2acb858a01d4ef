"""TorchServe handlers: a shared base, task layers, and (only where settings are not enough) per-model classes."""
