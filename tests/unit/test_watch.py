"""The served model's watch: per-minute counts, their summary for GET /stats, and drift
against the training data (no Serve here; tests/integration/test_serve.py sends traffic)."""

import numpy as np
import pytest

from raybm.metrics import drift_reference, population_stability_index
from raybm.serve.watch import WINDOW_MINUTES, Minutes, summarize

TRAIN_LABELS = {"negative": 70, "positive": 30}
TOKENS = {"p50": 10, "p90": 20, "p95": 25, "p99": 40}
T0 = 1_800_000_000.0  # a minute boundary


def test_the_summary_counts_traffic_latency_errors_answers_and_confidence():
    m = Minutes(low_confidence=0.6)
    for i in range(10):  # minute 0: 10 requests of 2 texts, latency 10..19 ms, one server error
        m.record(
            500 if i == 0 else 200,
            10.0 + i,
            [] if i == 0 else [("negative", 0.9), ("positive", 0.55)],
            [0, 1],
            now=T0 + i,
        )
    m.record(422, 1.0, [], [], now=T0 + 61)  # minute 1: a client's mistake
    out = summarize(m.export(), None, now=T0 + 62)
    total = out["total"]
    assert total["requests"] == 11 and total["errors"] == 1 and total["refused"] == 1
    assert total["error_rate"] == pytest.approx(1 / 11) and total["answers"] == 18
    assert total["labels"] == {"negative": 9, "positive": 9} and total["low_confidence_share"] == pytest.approx(0.5)
    latencies = [10.0 + i for i in range(10)] + [1.0]
    assert total["latency_p50_ms"] == pytest.approx(np.percentile(latencies, 50))
    assert total["latency_p95_ms"] == pytest.approx(np.percentile(latencies, 95))
    assert [s["requests"] for s in out["series"]] == [10, 1] and out["series"][0]["minute"] == T0
    assert out["recent"]["requests_per_s"] == pytest.approx(11 / 300) and out["drift"] is None


def test_only_the_last_hour_is_kept():
    m = Minutes()
    for minute in range(WINDOW_MINUTES + 5):
        m.record(200, 1.0, [("a", 0.9)], [], now=T0 + 60 * minute)
    kept = m.export()
    assert len(kept) == WINDOW_MINUTES and kept[0]["minute"] == int(T0 // 60) + 5


def test_drift_flags_a_label_mix_or_input_lengths_unlike_the_training_data():
    ref = drift_reference("twitter-1", TRAIN_LABELS, TOKENS)
    assert ref["labels"] == {"negative": 0.7, "positive": 0.3} and ref["length_edges"] == [10, 20, 25, 40]
    like, unlike = Minutes(), Minutes()
    bins = [0] * 50 + [1] * 40 + [2] * 5 + [3] * 4 + [4]  # the training split's shares
    for i, length_bin in enumerate(bins):
        like.record(200, 5.0, [("negative" if i < 70 else "positive", 0.9)], [length_bin], now=T0 + i)
        unlike.record(200, 5.0, [("positive", 0.9)], [4], now=T0 + i)  # every text positive and very long
    calm = summarize(like.export(), ref, now=T0 + 120)["drift"]
    moved = summarize(unlike.export(), ref, now=T0 + 120)["drift"]
    assert calm["labels_psi"] < 0.01 and calm["lengths_psi"] < 0.01 and calm["alert"] is False
    assert moved["labels_psi"] > 0.2 and moved["lengths_psi"] > 0.2 and moved["alert"] is True
    assert moved["reference"] == "twitter-1"


def test_the_population_stability_index_by_hand():
    import math

    assert population_stability_index([0.5, 0.5], [50, 50]) == 0.0
    assert population_stability_index([0.7, 0.3], [30, 70]) == pytest.approx(
        (0.3 - 0.7) * math.log(0.3 / 0.7) + (0.7 - 0.3) * math.log(0.7 / 0.3)
    )
    assert population_stability_index([0.5, 0.5], [0, 0]) is None
