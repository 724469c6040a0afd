"""Models: building a classifier from a base model, raybm's own architectures, the model card."""
