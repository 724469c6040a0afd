"""Training: the driver that runs a TorchTrainer, and the loop each Ray Train worker runs."""
