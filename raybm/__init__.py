"""raybm: fine-tune pretrained transformers on Ray, from raw data to a served model."""

__version__ = "0.1.0"
