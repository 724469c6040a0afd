"""The dashboard's Live page: how the served model is doing, from its ``GET /stats``:
requests per second, p50 and p95 latency, error rate, the label mix and the low-confidence
share over time, and a drift flag when the inputs move away from the training data."""

from __future__ import annotations

import os
from types import ModuleType

import pandas as pd

from raybm.errors import RaybmError
from raybm.serve.client import ServerUnreachable, get_stats


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def page_live(serve_url: str | None) -> None:
    """The Live page of the model server at ``serve_url``."""
    import altair as alt
    import streamlit as st

    st.title("Live")
    if not serve_url:
        st.info(
            "Start the dashboard with --serve-url http://<host>:<port> (or RAYBM_SERVE_URL) to watch a model server."
        )
        return
    try:
        stats = get_stats(serve_url, os.environ.get("RAYBM_API_KEY") or None)
    except ServerUnreachable:
        st.info(
            f"No model server answers at {serve_url} yet. Start one with `raybm serve --model <a model folder, "
            f"run or sweep>` (it prints the address to give here with --serve-url), then reload this page."
        )
        return
    except RaybmError as e:
        st.warning(str(e))
        return
    recent = stats["recent"]
    st.caption(
        f"Model {stats.get('model')} at {serve_url}: the last {stats['recent_minutes']} minutes; the charts "
        f"cover the last {stats['window_minutes']} minutes, by minute."
    )
    cols = st.columns(5)
    cols[0].metric("Requests per second", f"{recent['requests_per_s']:.2f}")
    cols[1].metric("Latency p50", _ms(recent["latency_p50_ms"]))
    cols[2].metric("Latency p95", _ms(recent["latency_p95_ms"]))
    cols[3].metric(
        "Error rate",
        _pct(recent["error_rate"]),
        help=f"answers 5xx; refused client requests (4xx) are counted apart: {recent['refused']}",
    )
    cols[4].metric("Low-confidence answers", _pct(recent["low_confidence_share"]))
    proxies = stats.get("serve")
    if proxies:
        st.caption(
            f"Since Serve started, its proxies counted {proxies['requests']:,} requests: "
            f"{proxies['shed']:,} shed as overload (503) and {proxies['timed_out']:,} timed out (408) "
            f"before a replica answered."
        )
    _drift(stats.get("drift"), st)
    series = pd.DataFrame(stats["series"])
    if series.empty:
        st.info("No requests in the last hour yet.")
        return
    series["time"] = pd.to_datetime(series["minute"], unit="s")
    line = alt.Chart(series).mark_line(point=True)
    st.altair_chart(
        line.encode(x=alt.X("time:T", title="minute"), y=alt.Y("requests_per_s:Q", title="requests / s")).properties(
            title="Traffic (requests per second)"
        ),
        width="stretch",
    )
    latency = series.melt(
        id_vars="time", value_vars=["latency_p50_ms", "latency_p95_ms"], var_name="quantile", value_name="ms"
    )
    st.altair_chart(
        alt.Chart(latency)
        .mark_line(point=True)
        .encode(x=alt.X("time:T", title="minute"), y=alt.Y("ms:Q", title="latency (ms)"), color="quantile:N")
        .properties(title="Latency (ms, p50 and p95)"),
        width="stretch",
    )
    mix = pd.DataFrame(
        [
            {"time": t, "label": lab, "answers": n}
            for t, labels in zip(series["time"], series["labels"])
            for lab, n in labels.items()
        ]
    )
    if not mix.empty:
        st.altair_chart(
            alt.Chart(mix)
            .mark_bar()
            .encode(
                x=alt.X("time:T", title="minute"),
                y=alt.Y("answers:Q", stack="normalize", title="share of answers"),
                color="label:N",
            )
            .properties(title="Label mix (share of answers)"),
            width="stretch",
        )
    st.altair_chart(
        line.encode(
            x=alt.X("time:T", title="minute"),
            y=alt.Y("low_confidence_share:Q", title="share of answers", axis=alt.Axis(format="%")),
        ).properties(title="Low-confidence answers (share)"),
        width="stretch",
    )


def _drift(drift: dict | None, st: ModuleType) -> None:
    """The drift flag: population stability index of the label mix and input lengths."""
    if drift is None:
        st.caption(
            "Drift: this model carries no reference of its training data (models trained before "
            "raybm kept one), so there is nothing to compare with."
        )
        return
    values = {k: drift.get(f"{k}_psi") for k in ("labels", "lengths")}
    shown = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -" for k, v in values.items())
    if drift["alert"]:
        st.error(
            f"Drift: today's texts do not look like the training data ({drift.get('reference')}): "
            f"population stability index {shown} (above {drift['threshold']:g} means a real shift). "
            f"Check the inputs, and retrain on newer data if it lasts."
        )
    else:
        st.success(
            f"No drift: the label mix and input lengths match the training data ({shown}; "
            f"an alert above {drift['threshold']:g})."
        )
