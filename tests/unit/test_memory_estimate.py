"""The memory estimate before a run (raybm.train.memory): parts that move as the settings
say, from a model built on the meta device, and the fit against nodes' memory."""

import json

import pytest

from raybm.config import build_config
from raybm.train.memory import GB, architecture, estimate, fits

NODE_24GB = {"CPU": 2.0, "memory": 16e9, "object_store_memory": 8e9}


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    """A config-only Llama-style model folder of about 1.2B parameters (no weights: sizing needs none)."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-1b")
    LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=16,
        num_key_value_heads=4,
        pad_token_id=0,
    ).save_pretrained(folder)
    return str(folder)


def cfg_for(model, *overrides):
    return build_config(overrides=[f"model.name={model}", "data.max_length=32", "train.batch_size=4", *overrides])


def test_the_parameters_are_counted_exactly_from_the_architecture(llama_1b):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    arch = architecture(cfg_for(llama_1b), ["a", "b"])
    import torch

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(LlamaConfig.from_pretrained(llama_1b, num_labels=2))
    assert arch.params == sum(p.numel() for p in model.parameters())
    assert 1.0e9 < arch.params < 1.3e9 and arch.trainable == arch.params and arch.layers == 22
    lora = architecture(cfg_for(llama_1b, "train.strategy=lora"), ["a", "b"])
    assert lora.params > arch.params and lora.trainable < 0.01 * arch.params  # adapters and the head only


def test_fsdp_shards_the_training_state_and_lora_trains_a_sliver(llama_1b):
    arch = architecture(cfg_for(llama_1b), ["a", "b"])
    ddp = estimate(cfg_for(llama_1b, "train.num_workers=2"), arch, use_gpu=False)
    fsdp2 = estimate(cfg_for(llama_1b, "train.num_workers=2", "train.parallelism=fsdp"), arch, use_gpu=False)
    fsdp4 = estimate(cfg_for(llama_1b, "train.num_workers=4", "train.parallelism=fsdp"), arch, use_gpu=False)
    state = ("weights", "gradients", "optimizer")
    assert sum(ddp.parts[k] for k in state) == pytest.approx(16 * arch.params)  # fp32 AdamW: 16 bytes a parameter
    assert sum(fsdp2.parts[k] for k in state) == pytest.approx(8 * arch.params)
    assert sum(fsdp4.parts[k] for k in state) == pytest.approx(4 * arch.params)
    assert ddp.parts["DDP buckets"] == pytest.approx(4 * arch.params) and "DDP buckets" not in fsdp2.parts
    assert fsdp4.per_worker < fsdp2.per_worker < ddp.per_worker
    assert fsdp2.rank0 > fsdp2.per_worker  # rank 0 loads the whole model before sharding it
    lora = estimate(
        cfg_for(llama_1b, "train.strategy=lora"),
        architecture(cfg_for(llama_1b, "train.strategy=lora"), ["a", "b"]),
        use_gpu=False,
    )
    assert lora.per_worker < 0.35 * ddp.per_worker
    sgd = estimate(cfg_for(llama_1b, "train.optimizer=sgd"), arch, use_gpu=False)
    assert "optimizer" not in sgd.describe() and "weights" in sgd.describe()


def test_activations_grow_with_batch_and_length_and_checkpointing_cuts_them(llama_1b):
    arch = architecture(cfg_for(llama_1b), ["a", "b"])
    small = estimate(cfg_for(llama_1b), arch, use_gpu=False).parts["activations"]
    long = estimate(cfg_for(llama_1b, "data.max_length=512", "train.batch_size=8"), arch, False).parts["activations"]
    ckpt = estimate(
        cfg_for(llama_1b, "data.max_length=512", "train.batch_size=8", "train.gradient_checkpointing=true"), arch, False
    ).parts["activations"]
    assert long > 30 * small and ckpt < long / 5


def test_workers_fit_a_node_only_while_their_sum_does(llama_1b):
    arch = architecture(cfg_for(llama_1b), ["a", "b"])
    one = cfg_for(llama_1b, "train.strategy=lora")
    lora = estimate(one, architecture(one, ["a", "b"]), False)
    assert fits(one, lora, [NODE_24GB])
    alone = cfg_for(llama_1b, "train.cpus_per_worker=2")
    assert fits(alone, estimate(alone, arch, False), [NODE_24GB])  # ~17 GB of state + the process + its checkpoint
    ddp = cfg_for(llama_1b, "train.num_workers=2", "train.cpus_per_worker=1")
    assert not fits(ddp, estimate(ddp, arch, False), [NODE_24GB])  # two such replicas: over 0.9 x 24
    spread = cfg_for(llama_1b, "train.parallelism=fsdp", "train.num_workers=2", "train.cpus_per_worker=1")
    assert fits(spread, estimate(spread, arch, False), [NODE_24GB, NODE_24GB])  # one worker a node
    assert GB == 1e9 and json.dumps(estimate(ddp, arch, False).parts)  # plain numbers, printable


def test_offload_moves_the_state_to_host_memory_and_nf4_shrinks_the_frozen_base(llama_1b):
    arch = architecture(cfg_for(llama_1b), ["a", "b"])
    fsdp = cfg_for(llama_1b, "train.parallelism=fsdp", "train.num_workers=2")
    offload = cfg_for(llama_1b, "train.parallelism=fsdp", "train.num_workers=2", "train.cpu_offload=true")
    on_gpu, offloaded = estimate(fsdp, arch, use_gpu=True), estimate(offload, arch, use_gpu=True)
    assert offloaded.offloaded == pytest.approx(8 * arch.params) and "weights" not in offloaded.parts
    assert offloaded.per_worker < on_gpu.per_worker / 3 and "offloaded to host memory" in offloaded.describe()
    lora = cfg_for(llama_1b, "train.strategy=lora")
    qlora = cfg_for(llama_1b, "train.strategy=lora", "train.quantize_base=nf4")
    lora_arch = architecture(lora, ["a", "b"])
    full, nf4 = estimate(lora, lora_arch, True).parts["weights"], estimate(qlora, lora_arch, True).parts["weights"]
    assert 0.12 < nf4 / full < 0.15  # about half a byte a frozen weight instead of 4


def test_a_sweep_is_sized_by_its_most_demanding_trial():
    from raybm.config import build_config
    from raybm.config.search_space import parse_space
    from raybm.train.memory import largest_trial

    cfg = build_config(overrides=["train.batch_size=8", "data.max_length=64", "train.strategy=lora"])
    dists = parse_space(
        {
            "train.batch_size": "choice([4, 32, 16])",
            "data.max_length": "randint(32, 129)",
            "train.strategy": "grid([lora, full])",
            "train.lr": "loguniform(1e-5, 1e-3)",
        }
    )
    worst = largest_trial(cfg, dists)
    assert (worst.train.batch_size, worst.data.max_length, worst.train.strategy) == (32, 128, "full")
    assert largest_trial(cfg, parse_space({"train.lr": "uniform(1e-5, 1e-4)"})) is cfg  # nothing that moves memory
