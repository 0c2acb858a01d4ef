"""Export stage: weights → eager model → TorchScript, gated by a parity check against the eager model."""
