"""Every strategy on every common architecture (tiny random models of each, no Ray): the parts
the strategies act on, what trains, any batch size, LoRA, gradient checkpointing, ONNX and
int8 export, and the refusals before Ray starts."""

import json

import numpy as np
import pytest
import torch

from raybm.config import build_config
from raybm.errors import RaybmError
from raybm.models.architectures import ARCHITECTURES, model_parts, walk_parts
from raybm.models.build import TINY_MODELS, build_classifier, enable_checkpointing, load_tokenizer, with_pad_token
from raybm.models.lora import adapter_state, add_lora, merged
from raybm.models.strategies import apply_strategy, check_fits_architecture, param_groups
from raybm.train.optim import build_optimizer

LABELS = ["negative", "positive"]
TINY = sorted(TINY_MODELS)
DECODERS = [n for n in TINY if ARCHITECTURES[TINY_MODELS[n][0]].decoder]
TEXTS = ["a good film", "the worst service I have had in years, never again", "fine"]


def build(name, *overrides, seed=0):
    cfg = build_config(overrides=[f"model.name={name}", *overrides])
    return cfg, build_classifier(cfg.model, LABELS, seed=seed)


def batch(texts=TEXTS, name="tiny-bert"):
    return load_tokenizer(name)(texts, padding=True, return_tensors="pt")


def ids_of(modules):
    return {id(p) for m in modules for p in m.parameters()}


def test_the_tiny_models_cover_every_architecture_in_the_table_we_promise():
    kinds = {kind for kind, _ in TINY_MODELS.values()}
    assert kinds == {
        "bert",
        "roberta",
        "distilbert",
        "deberta-v2",
        "electra",
        "modernbert",
        "gpt2",
        "qwen2",
        "llama",
        "mistral",
    }
    assert kinds <= set(ARCHITECTURES)


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_belongs_to_exactly_one_part(name):
    _, model = build(name)
    parts = model_parts(model)
    assert parts.architecture == TINY_MODELS[name][0] and len(parts.layers) == 2 and parts.embeddings
    groups = [ids_of(parts.layers), ids_of(parts.embeddings), ids_of(parts.after), ids_of(parts.head)]
    everything = {id(p) for p in model.parameters()}
    assert set().union(*groups) == everything, "a parameter no strategy knows about"
    assert sum(len(g) for g in groups) == len(everything), "a parameter in two parts"
    assert parts.decoder == (name in DECODERS)


@pytest.mark.parametrize("name", TINY)
def test_the_generic_walk_finds_what_the_table_says(name):
    _, model = build(name)
    table, walk = model_parts(model), walk_parts(model)
    assert [id(m) for m in walk.layers] == [id(m) for m in table.layers]
    assert ids_of(walk.head) == ids_of(table.head) and walk.decoder == table.decoder
    if (
        name == "tiny-deberta-v2"
    ):  # its relative-position norm sits after the layers; the table files it with the embeddings
        assert ids_of(walk.embeddings) | ids_of(walk.after) == ids_of(table.embeddings) | ids_of(table.after)
    else:
        assert ids_of(walk.embeddings) == ids_of(table.embeddings) and ids_of(walk.after) == ids_of(table.after)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("strategy", ["full", "partial", "gradual", "lora", "decay"])
def test_every_strategy_trains_exactly_what_it_says(name, strategy):
    overrides = {
        "partial": ["train.strategy=partial", "train.freeze_layers=1"],
        "gradual": ["train.strategy=gradual"],
        "lora": ["train.strategy=lora"],
        "decay": ["train.layerwise_lr_decay=0.5"],
        "full": [],
    }[strategy]
    cfg, model = build(name, "train.lr=0.05", "model.head_init=xavier", *overrides)
    check_fits_architecture(cfg)
    if strategy == "lora":
        model = add_lora(model, cfg.train)
    epoch = 1 if strategy == "gradual" else 0  # gradual: the head and the top layer
    trainable = apply_strategy(model, cfg.train, epoch)
    parts = model_parts(model)
    expected = {
        "full": ids_of([model]),
        "decay": ids_of([model]),
        "partial": ids_of(parts.head + parts.layers[1:] + parts.after),
        "gradual": ids_of(parts.head + parts.layers[1:] + parts.after),
    }.get(strategy)
    if expected is not None:
        assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    else:  # lora: the adapters and the head
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names and all("lora_" in n or "modules_to_save" in n for n in names)
        assert trainable < sum(p.numel() for p in model.parameters()) / 5
    groups = param_groups(model, cfg.train.lr, 0.01, cfg.train.layerwise_lr_decay)
    if strategy == "decay":  # embeddings, bottom layer, top layer and the final norm, head
        assert sorted({g["lr_scale"] for g in groups}) == [0.125, 0.25, 0.5, 1.0]
    optimizer = build_optimizer(model, cfg.train, groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    enc = batch(name=name)
    model.train()
    model(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor([0, 1, 0])
    ).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert changed and not (changed & frozen)


@pytest.mark.parametrize("name", TINY)
def test_any_batch_size_gives_each_text_the_same_answer(name):
    _, model = build(name)
    model.eval()
    tokenizer = load_tokenizer(name)
    assert model.config.pad_token_id == tokenizer.pad_token_id and tokenizer.padding_side == "right"
    with torch.no_grad():
        together = model(**{k: v for k, v in batch(name=name).items() if k != "token_type_ids"}).logits
        alone = torch.cat(
            [model(**{k: v for k, v in batch([t], name).items() if k != "token_type_ids"}).logits for t in TEXTS]
        )
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_a_decoder_without_a_pad_token_gets_one(name):
    from raybm.models.build import tiny_config

    assert tiny_config(name, {}).pad_token_id is None  # as in real GPT-2 and Llama checkpoints
    tokenizer = load_tokenizer(name)
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"
    assert with_pad_token(tokenizer).pad_token == "[SEP]"
    tokenizer.pad_token = tokenizer.eos_token = tokenizer.sep_token = None
    with pytest.raises(RaybmError, match="no pad, end-of-sequence or separator token"):
        with_pad_token(tokenizer, "'m'")


@pytest.mark.parametrize("name", TINY)
def test_cropping_mean_pooling_and_checkpointing_build_and_learn(name):
    cfg, model = build(
        name, "model.keep_layers=1", "model.pooling=mean", "train.gradient_checkpointing=true", "train.lr=0.01"
    )
    check_fits_architecture(cfg)
    assert len(model_parts(model).layers) == 1
    enable_checkpointing(model)
    optimizer = build_optimizer(model, cfg.train)
    enc = batch(name=name)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor([0, 1, 0])
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", TINY)
def test_lora_checkpoints_hold_the_adapters_and_the_merged_model_answers_the_same(name):
    cfg, model = build(name, "train.strategy=lora", "train.lora_rank=4", "train.gradient_checkpointing=true")
    enable_checkpointing(model)
    model = add_lora(model, cfg.train)
    optimizer = build_optimizer(model, cfg.train)
    enc = batch(name=name)
    for _ in range(2):
        model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=torch.tensor([0, 1, 0])
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = adapter_state(model)
    assert all("lora_" in k or any(h in k for h in ("classifier", "score", "pooler", "head")) for k in state)
    assert sum(v.numel() for v in state.values()) < sum(p.numel() for p in model.parameters()) / 5
    model.eval()
    with torch.no_grad():
        want = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        plain = merged(model)
        assert not any("lora_" in n for n, _ in plain.named_parameters())
        got = plain(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert torch.allclose(want, got, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_onnx_int8_and_predict_for_every_architecture(name, tmp_path):
    from raybm.export.onnx import export_onnx, quantize_onnx
    from raybm.inference.loading import load_onnx, load_predictor

    _, model = build(name, seed=1)
    folder = tmp_path / "model"
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(name).save_pretrained(folder)
    (folder / "label_map.json").write_text(json.dumps({"labels": LABELS}))
    want = load_predictor(str(folder)).predict(TEXTS)
    assert want.shape == (3, 2)
    assert export_onnx(str(folder), str(tmp_path / "onnx"))["max_relative_logit_error"] < 1e-4
    assert np.allclose(load_onnx(str(tmp_path / "onnx")).predict(TEXTS), want, atol=1e-4)
    quantize_onnx(str(tmp_path / "onnx"), str(tmp_path / "int8"))
    assert np.abs(load_onnx(str(tmp_path / "int8")).predict(TEXTS) - want).max() < 0.1


@pytest.mark.parametrize("name", TINY)
def test_pruning_reaches_every_architectures_weight_matrices(name, tmp_path):
    from raybm.export.trained import prune_model, pruning_targets
    from raybm.inference.loading import load_predictor

    _, model = build(name)
    folder = tmp_path / "model"
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(name).save_pretrained(folder)
    (folder / "label_map.json").write_text(json.dumps({"labels": LABELS}))
    assert len(pruning_targets(model)) >= 8  # attention and feed-forward matrices of both layers (GPT-2's are Conv1D)
    assert prune_model(str(folder), str(tmp_path / "pruned"), 0.5) == pytest.approx(0.5, abs=0.01)
    assert load_predictor(str(tmp_path / "pruned")).predict(TEXTS).shape == (3, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.name=textcnn", "train.strategy=partial"],
            "model.name=textcnn (raybm-textcnn): train.strategy=partial works layer by layer, but raybm-textcnn has no "
            "stack of transformer layers; use train.strategy=full",
        ),
        (["model.name=textcnn", "train.layerwise_lr_decay=0.8"], "train.layerwise_lr_decay=0.8 works layer by layer"),
        (
            ["model.name=textcnn", "tune.search_space={train.strategy: 'choice([full, gradual])'}"],
            "train.strategy=gradual works layer by layer",
        ),
        (
            ["model.name=tiny-gpt2", "train.strategy=lora", "train.lora_targets=[q_proj]"],
            "model.name=tiny-gpt2 (gpt2): train.strategy=lora: train.lora_targets: gpt2 has no Linear module "
            "named q_proj in its layers; it has: c_attn, c_fc, c_proj",
        ),
        (
            ["model.name=textcnn", "train.gradient_checkpointing=true"],
            "train.gradient_checkpointing is not supported by this architecture",
        ),
    ],
)
def test_settings_an_architecture_cannot_take_are_refused_before_ray_starts(overrides, message):
    with pytest.raises(RaybmError) as e:
        check_fits_architecture(build_config(overrides=overrides))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.strategy=lora", "train.layerwise_lr_decay=0.9"], "layerwise_lr_decay does not apply"),
        (["train.strategy=lora", "train.keep_sparsity=true"], "keep_sparsity does not work with train.strategy=lora"),
        (["train.strategy=lora", "train.freeze_layers=2"], "only used with train.strategy=partial"),
    ],
)
def test_lora_settings_that_conflict_are_refused_when_the_config_loads(overrides, message):
    from raybm.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_config(overrides=overrides)


def test_lora_settings_are_searchable_and_each_sampled_trial_is_checked():
    space = (
        "tune.search_space={train.strategy: 'grid([full, lora])', train.lora_rank: 'choice([4, 16])', "
        "train.lora_alpha: 'uniform(8, 32)', train.lora_dropout: 'uniform(0, 0.2)'}"
    )
    check_fits_architecture(build_config(overrides=["model.name=tiny-gpt2", space]))
    bad = space.replace("}", ", train.lora_targets: 'choice([[c_attn], [q_proj]])'}")
    with pytest.raises(RaybmError, match="gpt2 has no Linear module named q_proj"):
        check_fits_architecture(build_config(overrides=["model.name=tiny-gpt2", bad]))


@pytest.mark.parametrize("name", TINY)
def test_every_architecture_learns_from_a_distillation_teacher(name, tiny_model_dir):
    from raybm.train.losses import distill_loss, load_teacher

    cfg, student = build(name, "train.lr=0.01")
    teacher = load_teacher(tiny_model_dir, torch.device("cpu"))  # a BERT teaching any architecture (one tokenizer)
    with torch.no_grad():  # a random teacher is unsure of everything: make it sure, so there is something to learn
        teacher.classifier.weight.mul_(300)
    enc = batch(name=name)
    optimizer = build_optimizer(student, cfg.train)
    student.train()
    losses = []
    for _ in range(6):
        logits = student(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        loss = distill_loss(logits, teacher, enc, temperature=2.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
