"""Strategies, cropping, head init, optimizers and schedules on tiny models (no Ray)."""

import pytest
import torch

from raybm.config import build_config
from raybm.models.build import build_classifier
from raybm.models.strategies import apply_strategy, encoder_layers, param_groups
from raybm.train.optim import build_optimizer, lr_factor

LABELS = ["neg", "pos"]


def tiny(*overrides):
    cfg = build_config(overrides=["model.name=tiny-bert", *overrides])
    return cfg, build_classifier(cfg.model, LABELS, seed=0)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_full_and_partial_trainable_counts():
    cfg, model = tiny("train.strategy=partial", "train.freeze_layers=1")
    total = count(model)
    layers = encoder_layers(model)
    emb = count(model.bert.embeddings)
    assert apply_strategy(model, cfg.train, 0) == total - emb - count(layers[0])
    cfg, model = tiny("train.strategy=partial", "train.freeze_layers=-1")
    assert apply_strategy(model, cfg.train, 0) == count(model.classifier) + count(model.bert.pooler)
    cfg, model = tiny("train.strategy=full")
    assert apply_strategy(model, cfg.train, 0) == total


def test_gradual_unfreezes_one_layer_from_the_top_per_step():
    cfg, model = tiny("train.strategy=gradual", "train.unfreeze_every=2")
    layers = encoder_layers(model)
    head = count(model.classifier) + count(model.bert.pooler)
    got = [apply_strategy(model, cfg.train, epoch) for epoch in range(7)]
    top, second, emb = count(layers[1]), count(layers[0]), count(model.bert.embeddings)
    assert got == [
        head,
        head,
        head + top,
        head + top,
        head + top + second,
        head + top + second,
        head + top + second + emb,
    ]
    # the top layer is the one unfrozen first
    apply_strategy(model, cfg.train, 2)
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not any(p.requires_grad for p in layers[0].parameters())


def test_scratch_differs_from_pretrained_and_cropping_keeps_first_layers():
    cfg = build_config(overrides=["model.keep_layers=2"])
    pre = build_classifier(cfg.model, LABELS, pretrained=True)
    scratch = build_classifier(cfg.model, LABELS, pretrained=False)
    assert len(encoder_layers(pre)) == 2 and pre.base_model.config.num_hidden_layers == 2
    w_pre = pre.base_model.encoder.layer[0].attention.self.query.weight
    w_scr = scratch.base_model.encoder.layer[0].attention.self.query.weight
    assert not torch.allclose(w_pre, w_scr)
    full = build_classifier(build_config().model, LABELS)
    assert torch.allclose(
        full.base_model.encoder.layer[1].output.dense.weight, pre.base_model.encoder.layer[1].output.dense.weight
    )


def test_head_init_and_dropout_overrides():
    _, default = tiny()
    _, xavier = tiny("model.head_init=xavier")
    assert not torch.allclose(default.classifier.weight, xavier.classifier.weight)
    assert xavier.classifier.bias.abs().sum() == 0
    _, normal = tiny("model.head_init=normal")
    assert abs(normal.classifier.weight.std().item() - 0.02) < 0.01
    _, dropped = tiny("model.hidden_dropout=0.3", "model.attention_dropout=0.2", "model.classifier_dropout=0.4")
    assert dropped.config.hidden_dropout_prob == 0.3 and dropped.config.attention_probs_dropout_prob == 0.2
    assert dropped.dropout.p == 0.4


def test_layerwise_lr_decay_groups():
    cfg, model = tiny()
    groups = param_groups(model, lr=1.0, weight_decay=0.1, layerwise_decay=0.5)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.125, 0.25, 0.5, 1.0]  # embeddings, layer 0, layer 1, head
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.dim() < 2 for p in g["params"]))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adagrad", "adadelta", "rmsprop", "adam", "adamw"])
@pytest.mark.parametrize("strategy", ["full", "partial", "gradual", "scratch"])
def test_every_optimizer_and_strategy_takes_a_step(optimizer, strategy):
    cfg, model = tiny(
        f"train.optimizer={optimizer}",
        f"train.strategy={strategy}",
        "train.lr=0.05",
        "train.nesterov=true",
        "train.l1=0.001",
    )
    apply_strategy(model, cfg.train, 0)
    opt = build_optimizer(model, cfg.train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1000, 2000, (4, 12))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "classifier.weight" in changed
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not (changed & frozen)


def test_schedules():
    cfg = build_config(overrides=["train.warmup_ratio=0.1", "train.scheduler=linear"])
    t = cfg.train
    f = [lr_factor(s, t, steps_per_epoch=10, total_steps=100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5) and f[-1] < 0.02
    cos = build_config(overrides=["train.warmup_ratio=0", "train.scheduler=cosine"]).train
    assert lr_factor(50, cos, 10, 100) == pytest.approx(0.5)
    step = build_config(
        overrides=["train.warmup_ratio=0", "train.scheduler=step", "train.step_epochs=2", "train.step_gamma=0.1"]
    ).train
    assert [lr_factor(s, step, 10, 100) for s in (0, 19, 20, 40)] == pytest.approx([1, 1, 0.1, 0.01])
    const = build_config(overrides=["train.warmup_ratio=0", "train.scheduler=constant"]).train
    assert lr_factor(99, const, 10, 100) == 1.0


def test_textcnn_baseline_trains_saves_and_loads(tmp_path):
    import json

    from raybm.inference.evaluate import Classify

    cfg = build_config(
        overrides=["model.name=textcnn", "train.strategy=scratch", "train.lr=0.01", "model.classifier_dropout=0.1"]
    )
    model = build_classifier(cfg.model, LABELS)
    assert type(model).__name__ == "TextCNNForSequenceClassification" and model.dropout.p == 0.1
    opt = build_optimizer(model, cfg.train)
    ids = torch.randint(1000, 2000, (8, 2))  # shorter than the widest kernel
    y = torch.tensor([0, 1] * 4)
    losses = []
    for _ in range(20):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path, safe_serialization=True)
    from raybm.models.build import load_tokenizer

    load_tokenizer("textcnn").save_pretrained(tmp_path)
    (tmp_path / "label_map.json").write_text(json.dumps({"labels": LABELS}))
    clf = Classify(str(tmp_path), max_length=16)
    assert clf.predict(["good", "bad"]).shape == (2, 2)
    with pytest.raises(Exception, match="raybm-textcnn has no stack of transformer layers"):
        apply_strategy(model, build_config(overrides=["train.strategy=partial"]).train, 0)


def test_mean_pooling_classifier_strategies_and_round_trip(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from raybm.models.pooled import PooledClassifier

    cfg, model = tiny("model.pooling=mean", "train.strategy=gradual", "model.classifier_dropout=0.2")
    assert isinstance(model, PooledClassifier) and model.encoder.pooler is None
    assert model.dropout.p == 0.2
    layers = encoder_layers(model)
    head = count(model.classifier)
    got = [apply_strategy(model, cfg.train, epoch) for epoch in range(4)]
    assert got == [head, head + count(layers[1]), head + count(layers[1]) + count(layers[0]), count(model)]
    ids = torch.tensor([[101, 2000, 2001, 102, 0], [101, 2003, 102, 0, 0]])
    mask = (ids != 0).long()
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits
    # padding does not change a row's mean: the same row without its padding scores the same
    assert torch.allclose(model(input_ids=ids[1:, :3], attention_mask=mask[1:, :3]).logits, logits[1:], atol=1e-5)
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    again.eval()
    assert type(again) is PooledClassifier and torch.allclose(again(input_ids=ids, attention_mask=mask).logits, logits)


def test_pooling_auto_is_mean_for_sentence_transformers_folders():
    from raybm.errors import RaybmError
    from raybm.models.build import resolve_pooling

    assert resolve_pooling(build_config().model) == "mean"  # the built-in all-MiniLM-L6-v2
    assert resolve_pooling(build_config(overrides=["model.pooling=cls"]).model) == "cls"
    assert resolve_pooling(build_config(overrides=["model.name=tiny-bert"]).model) == "cls"
    with pytest.raises(RaybmError, match="textcnn"):
        resolve_pooling(build_config(overrides=["model.name=textcnn", "model.pooling=mean"]).model)


def test_the_plateau_schedule_lowers_the_rate_after_patience_epochs_without_improvement():
    from raybm.train.optim import plateau_scale

    t = build_config(
        overrides=["train.scheduler=plateau", "train.plateau_patience=2", "train.plateau_factor=0.5"]
    ).train
    assert lr_factor(10_000, t, 10, 20_000) == 1.0  # between epochs it is constant (after warmup)
    assert plateau_scale(1.0, 1, t) == (1.0, 1)
    assert plateau_scale(1.0, 2, t) == (0.5, 0)
    assert plateau_scale(0.5, 2, t) == (0.25, 0)
    other = build_config(overrides=["train.scheduler=linear"]).train
    assert plateau_scale(1.0, 5, other) == (1.0, 5)


PLAIN_TRANSFORMERS = """
import json, sys
sys.modules["raybm"] = None  # this process cannot import raybm
from transformers import AutoModelForSequenceClassification, pipeline
out = {}
for folder, trust in json.loads(sys.argv[1]):
    try:
        AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=trust)
        classify = pipeline("text-classification", model=folder, trust_remote_code=trust, top_k=None)
        out[folder] = [{a["label"]: a["score"] for a in answers} for answers in classify(json.loads(sys.argv[2]))]
    except Exception as e:
        out[folder] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_model_folders_load_with_plain_transformers_in_a_process_without_raybm(tmp_path):
    import json
    import subprocess
    import sys

    from raybm.inference.loading import load_predictor
    from raybm.models.build import load_tokenizer

    texts = ["what a lovely day", "the worst flight ever", "ok"]
    folders = {}
    for pooling in ("mean", "cls"):
        cfg, model = tiny(f"model.pooling={pooling}")
        folder = tmp_path / pooling
        model.save_pretrained(folder, safe_serialization=True)
        load_tokenizer("tiny-bert").save_pretrained(folder)
        (folder / "label_map.json").write_text(json.dumps({"labels": LABELS}))
        folders[pooling] = str(folder)
    # The mean-pooled folder carries its architecture's code, named by auto_map; the CLS one is standard BERT.
    assert json.loads((tmp_path / "mean" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "pooled.PooledClassifierConfig",
        "AutoModelForSequenceClassification": "pooled.PooledClassifier",
    }
    assert (tmp_path / "mean" / "pooled.py").is_file() and not (tmp_path / "cls" / "pooled.py").exists()
    want = {k: load_predictor(f).predict(texts) for k, f in folders.items()}

    def plain(pairs):
        run = subprocess.run(
            [sys.executable, "-c", PLAIN_TRANSFORMERS, json.dumps(pairs), json.dumps(texts)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    got = plain([[folders["mean"], True], [folders["cls"], False]])
    for kind, folder in folders.items():
        assert isinstance(got[folder], list), got[folder]
        probs = [[answer[label] for label in LABELS] for answer in got[folder]]
        assert torch.allclose(torch.tensor(probs), torch.tensor(want[kind], dtype=torch.float32), atol=1e-5), kind
    # raybm runs its own copy of the architecture, never the folder's: a folder whose code
    # file was tampered with still loads in raybm, and plain transformers runs the tampered one.
    (tmp_path / "mean" / "pooled.py").write_text("raise RuntimeError('the folder code ran')\n")
    assert load_predictor(folders["mean"]).predict(texts).shape == (3, 2)
    assert "the folder code ran" in plain([[folders["mean"], True]])[folders["mean"]]
