"""raybm's own architectures (the TextCNN baseline, the mean-pooled classifier) made known
to transformers' Auto classes, so that their saved model folders load like any other.

Each is also registered for the Hub's custom-code convention: ``save_pretrained`` copies
its module (``pooled.py``, ``baseline.py``: torch and transformers only) into the folder
and its config's ``auto_map`` goes into ``config.json``, so the folder loads without raybm with
``trust_remote_code=True``. raybm itself loads its own registered classes, never the
folder's copy (transformers prefers registered code unless told to trust the folder's).
Imports torch and transformers. Importing changes nothing: ``prepare_transformers`` (called
by every function that builds or loads a model) registers the architectures and quiets
transformers' weight-loading progress bars, once per process."""

from __future__ import annotations

from raybm.models.baseline import TextCNNConfig, TextCNNForSequenceClassification
from raybm.models.pooled import PooledClassifier, PooledClassifierConfig


def register_architectures() -> None:
    """Register each of raybm's architectures with AutoConfig and
    AutoModelForSequenceClassification (once; again is a no-op)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    for config_cls, model_cls in (
        (TextCNNConfig, TextCNNForSequenceClassification),
        (PooledClassifierConfig, PooledClassifier),
    ):
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForSequenceClassification.register(config_cls, model_cls)
        except ValueError:  # already registered
            pass
        # Saving a config (which every save of a model does) copies the config's module into
        # the folder; the config names both classes in its auto_map. Only the config is
        # registered so: a model wrapped by FSDP is of another class, defined elsewhere.
        config_cls.register_for_auto_class("AutoConfig")


_prepared = False


def prepare_transformers() -> None:
    """Make transformers ready for raybm's models, once per process: raybm's architectures
    registered with the Auto classes, and no "Loading weights" progress bar for every model
    loaded (in every Ray worker's log too; hub downloads keep theirs)."""
    global _prepared
    if _prepared:
        return
    from transformers.utils import logging as hf_logging

    register_architectures()
    hf_logging.disable_progress_bar()
    _prepared = True
