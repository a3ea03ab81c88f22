"""Training: the input pipeline, the losses, the training loop and its callback, the run directory."""
