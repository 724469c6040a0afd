"""FSDP workers loading pretrained weights with no whole copy anywhere (raybm.train.fsdp_loading):
every rank builds a skeleton and rank 0 streams the weights out of a multi-file model folder,
on real FSDP2 process groups (gloo, CPU)."""

import json
import os

import pytest
import torch

from tests.process_groups import spawn_ranks

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def multi_file_model(tmp_path_factory):
    """A tiny-bert classifier saved in several safetensors files, with its tokenizer."""
    from raybm.config import build_config
    from raybm.models.build import build_classifier, load_tokenizer

    folder = tmp_path_factory.mktemp("multi-file")
    build_classifier(build_config(overrides=["model.name=tiny-bert"]).model, LABELS, seed=7).save_pretrained(
        folder, max_shard_size="300KB"
    )
    load_tokenizer("tiny-bert").save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    return str(folder)


def _rank(rank: int, world: int, folder: str, strategy: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from raybm.config import build_config
    from raybm.train.fsdp import wrap_fsdp
    from raybm.train.worker import _model_to_shard

    cfg = build_config(overrides=[f"model.name={folder}", "train.parallelism=fsdp", f"train.strategy={strategy}"])
    model, plan, on_meta = _model_to_shard(cfg.train, cfg.model, LABELS, rank, torch.device("cpu"))
    assert plan is not None and on_meta  # rank 0 too builds only a skeleton
    assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    wrap_fsdp(model, torch.device("cpu"), stream=plan, seed=cfg.train.seed)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if rank == 0:
        torch.save({"state": full, "missing": plan.missing, "logits": logits.detach()}, out)


def _streamed(folder: str, strategy: str, tmp_path) -> dict:
    out = str(tmp_path / f"{strategy}.pt")
    spawn_ranks(_rank, 2, folder, strategy, out)
    return torch.load(out, weights_only=True)


def test_full_weights_stream_from_several_files_into_the_shards_exactly(multi_file_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    got = _streamed(multi_file_model, "full", tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(multi_file_model).eval()
    want = plain.state_dict()
    assert got["missing"] == []  # a classifier's own folder holds its head too
    assert set(got["state"]) == set(want)
    assert all(torch.equal(got["state"][k], want[k]) for k in want)
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(
            got["logits"], plain(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, atol=1e-5
        )


def test_lora_adapters_the_files_lack_start_as_peft_starts_them(multi_file_model, tmp_path):
    from safetensors.torch import load_file

    from raybm.train.fsdp_loading import plain_key

    got = _streamed(multi_file_model, "lora", tmp_path)
    state, missing = got["state"], got["missing"]
    assert missing and all("lora_" in k or "modules_to_save" in k or "original_module" in k for k in missing)
    files = {}
    for f in os.listdir(multi_file_model):
        if f.endswith(".safetensors"):
            files.update(load_file(os.path.join(multi_file_model, f)))
    base = {k: v for k, v in state.items() if k not in missing}
    assert base and all(torch.equal(v, files[plain_key(k)]) for k, v in base.items())
    assert (
        plain_key("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight")
        == "bert.encoder.layer.0.attention.self.query.weight"
    )
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    lora_a = [v for k, v in state.items() if "lora_A" in k]
    assert lora_b and all(v.abs().sum() == 0 for v in lora_b)  # PEFT starts B at zero: the base model's outputs
    assert lora_a and all(v.abs().sum() > 0 for v in lora_a)
    assert json.dumps(sorted(missing))  # names, printable
