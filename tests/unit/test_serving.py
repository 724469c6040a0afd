import json
import shutil

import pytest

from raybm.config import build_config
from raybm.errors import ConfigError, RaybmError
from raybm.inference.loading import model_info
from raybm.inference.locate import config_model, locate_model, model_name
from raybm.serve.app import SHED_HEADROOM, api_key_digest, deployment_options, read_api_key
from raybm.serve.contract import check_texts


def serve_cfg(*overrides):
    return build_config(overrides=list(overrides)).serve


def test_fixed_replicas_or_autoscaling():
    opts = deployment_options(serve_cfg("serve.num_replicas=3", "serve.cpus_per_replica=2"))
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"]["num_cpus"] == 2
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    # The handlers run on the loop that reads the requests (Ray 2.60's switch, in the replica's env).
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"]["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    opts = deployment_options(
        serve_cfg(
            "serve.min_replicas=0",
            "serve.max_replicas=4",
            "serve.target_ongoing_requests=8",
            "serve.max_queued_requests=10",
        )
    )
    assert opts["num_replicas"] == "auto"
    assert opts["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "initial_replicas": 1,
        "target_ongoing_requests": 8.0,
    }
    # The replica sheds beyond 32 + 10 requests in hand itself (counted); Serve lets them in.
    assert opts["max_queued_requests"] == -1 and opts["max_ongoing_requests"] == 32 + 10 + SHED_HEADROOM


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["serve.min_replicas=3", "serve.max_replicas=2"], "exceeds serve.max_replicas"),
        (["serve.route_prefix=api"], "must start with '/'"),
        (["serve.backend=int8", "serve.gpus_per_replica=1"], "CPU only"),
        (["serve.backend=tensorrt"], "serve.backend"),
        (["serve.max_texts=0"], "serve.max_texts"),
    ],
)
def test_bad_serve_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=overrides)


def test_api_key_comes_from_the_named_variable_and_only_its_digest_travels(monkeypatch):
    assert read_api_key(serve_cfg()) is None
    s = serve_cfg("serve.api_key_env=RAYBM_UNIT_KEY")
    monkeypatch.delenv("RAYBM_UNIT_KEY", raising=False)
    with pytest.raises(RaybmError, match="set the environment variable RAYBM_UNIT_KEY"):
        read_api_key(s)
    monkeypatch.setenv("RAYBM_UNIT_KEY", "abc")
    with pytest.raises(RaybmError, match="has 3 characters; use at least 16"):
        read_api_key(s)
    key = "a-long-enough-key-0123"
    monkeypatch.setenv("RAYBM_UNIT_KEY", key)
    first, second = read_api_key(s), read_api_key(s)
    assert first["salt"] != second["salt"] and first["hmac"] != second["hmac"]  # a fresh salt every start
    assert first["hmac"] == api_key_digest(key, first["salt"])
    assert key not in json.dumps(first) and api_key_digest("wrong-key-but-long-enough", first["salt"]) != first["hmac"]
    import hashlib

    assert hashlib.sha256(key.encode()).hexdigest() not in json.dumps(first)  # not the plain, unsalted digest


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_a_host_beyond_loopback_needs_a_key_or_an_explicit_opt_in(host):
    with pytest.raises(ConfigError, match="without an API key"):
        serve_cfg(f"serve.host='{host}'")
    assert serve_cfg(f"serve.host='{host}'", "serve.api_key_env=SOME_KEY").host == host
    assert serve_cfg(f"serve.host='{host}'", "serve.allow_without_key=true").allow_without_key
    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert serve_cfg(f"serve.host='{loopback}'").host == loopback


def test_text_that_is_not_valid_unicode_is_refused():
    s = serve_cfg()
    texts, status, message = check_texts({"texts": ["fine", "bad \ud800 text"]}, s)
    assert texts is None and status == 422
    assert (
        message == "texts[1] is not valid Unicode: it holds a lone surrogate (\\ud800) at character 4; send UTF-8 text"
    )


def test_one_failing_text_fails_only_itself():
    from raybm.serve.contract import predict_each

    def predict(texts):
        if any("boom" in t for t in texts):
            raise ValueError("tokenizer failed")
        return [[0.5, 0.5] for _ in texts]

    out = predict_each(predict, ["a", "boom", "c"])
    assert out[0] == [0.5, 0.5] and out[2] == [0.5, 0.5] and isinstance(out[1], ValueError)
    assert predict_each(predict, ["a", "b"]) == [[0.5, 0.5], [0.5, 0.5]]


def test_request_checks_name_the_problem():
    s = serve_cfg("serve.max_texts=2", "serve.max_text_chars=5")
    assert check_texts({"texts": ["a", "bb"]}, s) == (["a", "bb"], 0, "")
    assert check_texts({"texts": ["a", "b", "c"]}, s)[1] == 422
    assert check_texts({"texts": ["toolong"]}, s)[1:] == (422, "texts[0] is 7 characters long, the limit is 5")
    assert check_texts({"texts": [True]}, s)[2] == "texts[0] must be a string, got boolean"
    # one text without a list
    assert check_texts({"text": "fine"}, s) == (["fine"], 0, "")
    assert check_texts({"text": "toolong"}, s)[1:] == (422, '"text" is 7 characters long, the limit is 5')
    assert (
        check_texts({"text": ["a"]}, s)[2]
        == '"text" must be a string, got array; for several texts send {"texts": [...]}'
    )
    assert "not both" in check_texts({"text": "a", "texts": ["b"]}, s)[2]
    assert check_texts({"txt": "a"}, s)[2].startswith('missing field "texts" (or "text")')


def test_models_resolve_from_folders_and_names(tmp_path, tiny_model_dir):
    sweep = tmp_path / "sweeps" / "s1"
    shutil.copytree(tiny_model_dir, sweep / "model")
    (sweep / "winner.json").write_text(
        json.dumps(
            {
                "trial": "t1",
                "values": {"train.lr": 0.001},
                "metric": "val_f1_macro",
                "validation": 0.8,
                "best_epoch": 2,
                "test": {"accuracy": 0.9},
            }
        )
    )
    want = str(sweep / "model")
    cfg = build_config(overrides=[f"storage.root={tmp_path}"])
    assert locate_model(str(sweep / "model"), cfg) == want
    assert locate_model(str(sweep), cfg) == want
    assert locate_model("s1", cfg) == want
    assert model_name(want) == "s1" and model_name("s3://b/p/runs/r1/model") == "r1" and model_name("s3://b/m") == "m"
    with pytest.raises(RaybmError, match="not a model folder.*or a run/sweep name under"):
        locate_model("nope", cfg)
    with pytest.raises(RaybmError, match="--checkpoint 'no/such/folder': not a model folder"):
        locate_model("no/such/folder", cfg, flag="--checkpoint")
    card = model_info(want)
    assert card["name"] == "s1" and card["source_kind"] == "sweep" and card["test_metrics"] == {"accuracy": 0.9}
    assert card["model"] == "sweeps/s1/model" and card["source"] == "sweeps/s1"
    assert str(tmp_path) not in json.dumps(card)  # no local path
    assert card["winner"]["values"] == {"train.lr": 0.001}


def test_default_model_is_the_configs_own_job_result(tmp_path):
    cfg = build_config(overrides=[f"storage.root={tmp_path}"])
    with pytest.raises(RaybmError, match="run `raybm train --config ...` first"):
        locate_model(None, cfg)
    cfg = build_config(
        {"storage": {"root": str(tmp_path)}, "tune": {"search_space": {"train.lr": "loguniform(1e-5, 1e-3)"}}}
    )
    with pytest.raises(RaybmError, match="run `raybm tune --config ...` first"):
        config_model(cfg)


def test_an_answer_below_the_abstain_band_says_it_is_uncertain():
    import numpy as np

    from raybm.serve.contract import prediction

    sure, unsure = np.array([0.03, 0.97]), np.array([0.45, 0.55])
    assert prediction(["neg", "pos"], sure, 0.8) == {
        "label": "pos",
        "confidence": 0.97,
        "probabilities": {"neg": 0.03, "pos": 0.97},
        "uncertain": False,
    }
    assert prediction(["neg", "pos"], unsure, 0.8)["uncertain"] is True
    assert prediction(["neg", "pos"], unsure)["uncertain"] is False  # no band by default


def test_each_model_is_its_own_application_under_its_own_route():
    from raybm.serve.app import app_name_for, for_model

    s = for_model(serve_cfg(), "/r/runs/my-run/model")
    assert (s.app_name, s.route_prefix) == ("my-run", "/my-run")
    assert app_name_for("s3://b/r/exports/best/onnx-int8") == "best-onnx-int8"
    assert app_name_for("/r/sweeps/a b?c/model") == "a-b-c"
    s = for_model(serve_cfg("serve.app_name=sentiment", "serve.route_prefix=/api"), "/r/runs/x/model")
    assert (s.app_name, s.route_prefix) == ("sentiment", "/api")


@pytest.mark.parametrize(
    "running, overrides, message",
    [
        # Serve already open beyond this machine: a keyless model would be open to anyone.
        (("0.0.0.0", 8000, {}), ["serve.host=0.0.0.0", "serve.allow_without_key=true"], None),
        (("0.0.0.0", 8000, {}), [], r"listens on 0.0.0.0:8000, beyond this machine: 'x' without an API key"),
        # Serve keeps the address it started with: another port would not be applied.
        (("127.0.0.1", 8000, {}), ["serve.port=8001"], r"already listens on 127.0.0.1:8000 .*serve.port=8000"),
        (("127.0.0.1", 8000, {"other": "/x"}), [], r"route /x is served by the application 'other'"),
        (("127.0.0.1", 8000, {"x": "/x"}), [], None),  # the same name again: an update
        ((None, None, {"other": None}), [], None),  # a Ray that no longer tells: Serve's own checks decide
    ],
)
def test_a_running_serve_is_checked_before_anything_is_replaced(running, overrides, message, monkeypatch):
    from raybm.serve.app import for_model
    from raybm.serve.deploy import check_running_serve
    from raybm.serve.running import RunningServe

    s = for_model(serve_cfg(*overrides), "/r/runs/x/model")
    if message is None:
        check_running_serve(s, RunningServe(*running))
    else:
        with pytest.raises(RaybmError, match=message):
            check_running_serve(s, RunningServe(*running))


def test_a_nan_answer_fails_its_own_text_in_the_documented_form():
    import numpy as np

    from raybm.serve.contract import NonFiniteAnswer, predict_each

    def predict(texts):
        return np.array([[np.nan, np.nan] if t == "overflows" else [0.25, 0.75] for t in texts])

    got = predict_each(predict, ["fine", "overflows", "fine too"])
    assert isinstance(got[1], NonFiniteAnswer) and list(got[0]) == [0.25, 0.75] and list(got[2]) == [0.25, 0.75]


def test_a_model_card_shows_its_data_source_without_local_paths_or_credentials():
    from raybm.inference.loading import shown_source

    assert shown_source("/home/someone/private/reviews.csv") == "reviews.csv"
    assert shown_source("twitter-sentiment") == "twitter-sentiment"
    assert shown_source("s3://bucket/data/reviews/") == "s3://bucket/data/reviews/"
    assert shown_source("https://user:secret@example.com/x.csv") == "https://example.com/x.csv"
    assert shown_source(None) is None
