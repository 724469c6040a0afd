"""Model loaders injected into the Serve deployment by tests (imported by replicas as a
top-level module: the test puts this folder on the workers' PYTHONPATH).

Each wraps the real loader around the real tiny model; only the timing or the health of
the model is changed, to drive the server into overload and into a failing health check.
"""

import os
import threading
import time

from raybm.inference.loading import load_predictor


class _Wrapped:
    def __init__(self, inner):
        self.inner = inner
        self.labels = inner.labels

    def __getattr__(self, name):  # the tokenizer, probabilities ... (explanations): the real model's
        return getattr(self.inner, name)

    def predict(self, texts):
        return self.inner.predict(texts)


class _Slow(_Wrapped):
    """Takes 0.25 s a model call: a few concurrent requests saturate one replica."""

    def predict(self, texts):
        time.sleep(0.25)
        return self.inner.predict(texts)


def slow_loader(model_dir, **kwargs):
    return _Slow(load_predictor(model_dir, **kwargs))


class _Sickly(_Wrapped):
    """Fails every model call once its process id is listed in ``<model_dir>/../sick``."""

    def __init__(self, inner, sick_file):
        super().__init__(inner)
        self.sick_file = sick_file

    def predict(self, texts):
        if os.path.exists(self.sick_file):
            with open(self.sick_file) as f:
                if str(os.getpid()) in f.read().split():
                    raise RuntimeError("model failure injected by the test")
        return self.inner.predict(texts)


def sickly_loader(model_dir, **kwargs):
    """Writes this replica's pid to ``<model_dir>/../pids`` so the test can make it sick."""
    parent = os.path.dirname(model_dir)
    with open(os.path.join(parent, "pids"), "a") as f:
        f.write(f"{os.getpid()}\n")
    return _Sickly(load_predictor(model_dir, **kwargs), os.path.join(parent, "sick"))


class _Picky(_Wrapped):
    """Fails any model call whose texts include "poison": a text the model cannot handle."""

    def predict(self, texts):
        if any("poison" in t for t in texts):
            raise ValueError(f"cannot handle {os.path.abspath(__file__)}")  # a path that must not reach a client
        return self.inner.predict(texts)


def picky_loader(model_dir, **kwargs):
    return _Picky(load_predictor(model_dir, **kwargs))


class _Where(_Wrapped):
    """Notes, for each model call, the thread it ran on and its texts in ``<model_dir>/../threads``."""

    def __init__(self, inner, path):
        super().__init__(inner)
        self.path = path

    def predict(self, texts):
        with open(self.path, "a") as f:
            f.write(f"{threading.current_thread().name}\t{' | '.join(texts)}\n")
        return self.inner.predict(texts)


def where_loader(model_dir, **kwargs):
    return _Where(load_predictor(model_dir, **kwargs), os.path.join(os.path.dirname(model_dir), "threads"))
