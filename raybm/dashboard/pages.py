"""The Streamlit dashboard: what the jobs did, for engineers, and a "try it" page for
everyone else.

    raybm dashboard --root results [--serve-url http://127.0.0.1:8000]
    streamlit run dashboards/app.py -- --root results

Settings come from the command line or the environment (``RAYBM_RESULTS``,
``RAYBM_SERVE_URL``, ``RAYBM_API_KEY``), never from the page: a viewer picks runs, sweeps
and models from lists of what exists under the results root and cannot type a path.

The dashboard binds 127.0.0.1 unless told otherwise. With ``RAYBM_DASHBOARD_PASSWORD`` set
every visitor signs in first (``raybm.dashboard.login``), and on any other address it must
be set: no page is drawn, and so no request carries the model server's key, for a visitor
who has not signed in.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raybm.dashboard.live import page_live
from raybm.dashboard.login import signed_in
from raybm.dashboard.try_it import MAX_UPLOAD_MB, page_try
from raybm.errors import RaybmError
from raybm.storage.layout import RUNS, SWEEPS
from raybm.storage.records import FORMAT_KEY, soup_used

if TYPE_CHECKING:
    import altair as alt

    from raybm.dashboard.data import DashboardData

PAGES = ("Runs and sweeps", "Sweep", "Model", "Errors", "Try it", "Live")


def _job_columns() -> dict:
    """The runs table's columns: scores first and narrow, so the table fits a 1,400-pixel window."""
    import streamlit as st

    score = {"format": "%.4f", "width": "small"}
    return {
        "name": st.column_config.TextColumn("name", width="medium", help="the run or sweep (its folder)"),
        "test accuracy": st.column_config.NumberColumn(
            "test acc.", help="accuracy on the held-out test split", **score
        ),
        "test macro-F1": st.column_config.NumberColumn("test F1", help="macro-F1 on the held-out test split", **score),
        "best validation": st.column_config.NumberColumn(
            "best val.", help="the best validation score, of the metric named beside it", **score
        ),
        "metric": st.column_config.TextColumn("metric", width="small"),
        "kind": st.column_config.TextColumn("kind", width="small"),
        "status": st.column_config.TextColumn("status", width="small"),
        "minutes": st.column_config.NumberColumn("minutes", format="%.1f", width="small"),
        "started": st.column_config.DatetimeColumn("started", format="D MMM YYYY, HH:mm", width="small"),
        "base model": st.column_config.TextColumn("base model", width="small"),
        "dataset": st.column_config.TextColumn("dataset", width="small"),
    }


# Streamlit's settings for this app: `raybm dashboard` passes them as flags, and the
# shipped .streamlit/config.toml holds the same for `streamlit run dashboards/app.py`
# (a test keeps the two equal).
STREAMLIT_SETTINGS = {
    "server.address": "127.0.0.1",
    "server.maxUploadSize": MAX_UPLOAD_MB,
    "server.headless": True,
    "client.showErrorDetails": "none",
    "client.toolbarMode": "minimal",
    "browser.gatherUsageStats": False,
}


def settings(argv: list[str] | None = None) -> argparse.Namespace:
    """The results root and model server the dashboard was started with."""
    p = argparse.ArgumentParser(prog="raybm dashboard")
    p.add_argument("--root", default=os.environ.get("RAYBM_RESULTS", "results"))
    p.add_argument("--serve-url", default=os.environ.get("RAYBM_SERVE_URL"))
    args, _ = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args


def _data(root: str) -> DashboardData:
    import streamlit as st

    from raybm.dashboard.data import DashboardData

    @st.cache_resource(show_spinner=False)
    def load(r: str) -> DashboardData:
        return DashboardData(r)

    return load(root)


# ------------------------------------------------------------------------------ pages


def page_jobs(data: DashboardData) -> None:
    """The Jobs page: every run and sweep, best first, and the pipelines."""
    import streamlit as st

    st.title("Runs and sweeps")
    pipelines = data.pipelines_frame()
    if not pipelines.empty:
        st.subheader("Pipelines")
        st.caption("Each `raybm pipeline` / `jobs/pipeline.py` job: its stages, the release gate, where it serves.")
        # Every column in sight in a 1,400-pixel window: long cells (the name, the gate's
        # reasons, the stages) keep their column's width and show whole on hover; the
        # deployment's URL is a link.
        small = {
            c: st.column_config.TextColumn(width="small") for c in ("status", "started", "stages", "deploy", "gate")
        }
        st.dataframe(
            pipelines,
            hide_index=True,
            width="stretch",
            column_config={
                **small,
                "name": st.column_config.TextColumn(width="medium"),
                "test macro-F1": st.column_config.NumberColumn("test F1", format="%.3f", width="small"),
                "url": st.column_config.LinkColumn("serves at", display_text="open", width="small"),
                "minutes": st.column_config.NumberColumn(format="%.1f", width="small"),
            },
        )
    frame = data.jobs_frame()
    if frame.empty:
        st.info(
            f"Nothing here yet: no runs or sweeps under {data.root}. Run `make demo` or "
            f"`raybm train --config ...` and reload."
        )
        return
    st.caption(f"Results root: {data.root}. Click a column to sort.")
    st.dataframe(frame, hide_index=True, width="stretch", column_config=_job_columns())
    done = frame[frame["status"] == "complete"]
    if done.empty:
        return
    job = st.selectbox(
        "Open", list(zip(done["kind"], done["name"])), format_func=lambda o: f"{o[1]}  ({o[0]})", key="open_job"
    )
    kind = f"{job[0]}s"
    cols = st.columns(3)
    if job[0] == "sweep":
        cols[0].button("Sweep page", key="open_sweep", on_click=_open, args=("Sweep", "sweep", (kind, job[1])))
    cols[1].button("Model page", key="open_model", on_click=_open, args=("Model", "model", (kind, job[1])))
    cols[2].button("Errors page", key="open_errors", on_click=_open, args=("Errors", "errors", (kind, job[1])))


def _open(page: str, key: str, value: tuple[str, str]) -> None:
    """Go to ``page`` with ``value`` chosen in its picker (a button callback: runs before
    the widgets are drawn again)."""
    import streamlit as st

    st.session_state["page"] = page
    st.session_state[key] = value


def _pick(data: DashboardData, kinds: tuple[str, ...], key: str) -> tuple[str, str] | None:
    import streamlit as st

    options = [(k, n) for k in kinds for n in data.names(k)]
    if not options:
        st.info(f"No finished {' or '.join(k[:-1] for k in kinds)} under {data.root} yet.")
        return None
    return st.selectbox("Choose", options, format_func=lambda o: f"{o[1]}  ({o[0][:-1]})", key=key)


def page_sweep(data: DashboardData) -> None:
    """The Sweep page: leaderboard, learning curves and the winner."""
    import altair as alt
    import streamlit as st

    st.title("Sweep")
    picked = _pick(data, (SWEEPS,), "sweep")
    if not picked:
        return
    sweep = data.sweep(picked[1])
    board = sweep["leaderboard"]
    if not board:
        st.warning("This sweep has no leaderboard.")
        return
    winner = sweep["winner"]  # None while the sweep runs
    metric = winner.metric if winner else board[0].ranked_by()
    searched = list(winner.values) if winner and winner.values else list(board[0].searched())
    table = pd.DataFrame(
        [{k: v for k, v in row.to_json().items() if k not in ("history", FORMAT_KEY)} for row in board]
    )
    st.subheader("Leaderboard")
    st.dataframe(table, hide_index=True, width="stretch")
    soup = winner.soup if winner else None
    if soup_used(soup):
        st.info(
            f"The sweep's model is a {soup['method']} soup: the mean of the weights of "
            f"{len(soup['ingredients'])} trial(s) ({', '.join(soup['ingredients'])}), validation "
            f"{soup['metric']} {soup['validation']:.4f} against {soup['best_single']:.4f} for the best trial alone."
        )
    elif soup:
        st.info("A greedy soup was tried; no other trial improved validation, so the best trial is the model.")

    if "latency_p50_ms" in table and table["latency_p50_ms"].notna().any():
        st.subheader(f"Serving cost against {metric}")
        budget = winner.latency_budget if winner else None
        costed = table[table["latency_p50_ms"].notna()]
        chart = (
            alt.Chart(costed)
            .mark_circle(size=90)
            .encode(
                x=alt.X(
                    "latency_p50_ms",
                    title="median single-sentence latency (ms, PyTorch, 1 thread)",
                    scale=alt.Scale(zero=False),
                ),
                y=alt.Y(metric, scale=alt.Scale(zero=False)),
                color="status",
                tooltip=["trial", metric, "latency_p50_ms", "size_mb", "params", *searched],
            )
            .properties(title=f"{metric} against serving latency, one point per trial")
        )
        if budget:
            rule = (
                alt.Chart(pd.DataFrame({"budget": [budget["max_latency_ms"]]}))
                .mark_rule(color="red", strokeDash=[4, 4])
                .encode(x="budget:Q")
            )
            chart = chart + rule
        st.altair_chart(chart, width="stretch")
        if budget and budget["met"]:
            st.caption(
                f"Latency budget {budget['max_latency_ms']} ms (tune.max_latency_ms, dashed line): the "
                f"winner is the best of the {budget['trials_within']} trial(s) within it."
            )
        elif budget:
            st.warning(
                f"No trial met the latency budget of {budget['max_latency_ms']} ms (the fastest: "
                f"{budget['fastest_ms']} ms); the best trial won regardless."
            )

    st.subheader(f"Searched settings against {metric}")
    for key in searched:
        values = table[key]
        numeric = pd.api.types.is_numeric_dtype(values)
        log = numeric and (key.endswith("lr") or (values > 0).all() and values.max() / max(values.min(), 1e-12) > 30)
        x = alt.X(
            key, type="quantitative" if numeric else "nominal", scale=alt.Scale(type="log") if log else alt.Undefined
        )
        chart = (
            alt.Chart(table)
            .mark_circle(size=90)
            .encode(
                x=x,
                y=alt.Y(metric, scale=alt.Scale(zero=False)),
                color="status",
                tooltip=["trial", key, metric, "status"],
            )
        )
        st.altair_chart(chart.properties(title=f"{metric} by {key}, one point per trial"), width="stretch")

    st.subheader("Learning curves")
    curves = pd.DataFrame([{"trial": row.trial, **h} for row in board for h in row.history])
    if not curves.empty:
        for y in (metric, "val_loss"):
            if y in curves:
                st.altair_chart(
                    alt.Chart(curves)
                    .mark_line(point=True)
                    .encode(
                        x=alt.X("epoch:Q", title="epoch", axis=alt.Axis(tickMinStep=1)),
                        y=alt.Y(y, scale=alt.Scale(zero=False), title=y.replace("val_", "validation ")),
                        color="trial:N",
                        tooltip=["trial", "epoch", y],
                    )
                    .properties(
                        title=f"Learning curves: {y.replace('val_', 'validation ')} per epoch, one line per trial"
                    ),
                    width="stretch",
                )
    stopped = table[table["status"].isin(["stopped", "early-stopped", "error"])]
    st.subheader("Stopped trials")
    if stopped.empty:
        st.write("Every trial ran to the end.")
    else:
        st.dataframe(stopped[["trial", "status", "epochs_run", metric, *searched]], hide_index=True)
        st.caption(
            "`stopped`: the scheduler (ASHA / median) or the time budget ended it after `epochs_run` "
            "epochs; `early-stopped`: training's own patience."
        )


def _confusion_chart(cm: list[list[int]], labels: list[str]) -> alt.Chart:
    import altair as alt

    rows = [
        {"true": labels[i], "predicted": labels[j], "count": int(cm[i][j])}
        for i in range(len(labels))
        for j in range(len(labels))
    ]
    df = pd.DataFrame(rows)
    side = max(280, 90 * len(labels))  # readable: at least 90 px a class
    base = alt.Chart(df).encode(
        x=alt.X("predicted:N", sort=labels, title="predicted label"), y=alt.Y("true:N", sort=labels, title="true label")
    )
    chart = base.mark_rect().encode(
        color=alt.Color("count:Q", scale=alt.Scale(scheme="blues"), title="texts")
    ) + base.mark_text(fontSize=14).encode(text="count:Q")
    return chart.properties(width=side, height=side)


def page_model(data: DashboardData) -> None:
    """The Model page: a model's test metrics, confusion matrix and training history."""
    import altair as alt
    import streamlit as st

    st.title("Model")
    picked = _pick(data, (RUNS, SWEEPS), "model")
    if not picked:
        return
    info = data.model_info(*picked)
    test = info["test"]
    if not test:
        st.warning("This job has no test metrics yet.")
        return
    if info.get("soup"):
        soup = info["soup"]
        st.caption(
            f"A {soup['method']} model soup: the mean of the weights of {len(soup['ingredients'])} models "
            f"({', '.join(map(str, soup['ingredients']))}); validation {soup['metric']} "
            f"{soup['validation']:.4f}, the best of them alone {soup['best_single']:.4f}."
        )
    st.subheader(f"Test split ({test['examples']} examples)")
    cols = st.columns(4)
    for col, (label, key) in zip(
        cols,
        (
            ("accuracy", "accuracy"),
            ("macro-F1", "f1_macro"),
            ("macro precision", "precision_macro"),
            ("macro recall", "recall_macro"),
        ),
    ):
        col.metric(label, f"{test[key]:.4f}")
    per_class = pd.DataFrame(test["per_class"]).T.reset_index(names="class")
    st.dataframe(per_class, hide_index=True)
    st.altair_chart(
        _confusion_chart(test["confusion_matrix"], list(test["per_class"])).properties(
            title="Confusion matrix (rows: true label)"
        ),
        width="content",
    )

    report = data.dataset_report(info["dataset"])
    if report:
        st.subheader(f"Data: {report.dataset}")
        dist = pd.DataFrame(
            [{"split": s, "label": lab, "rows": n} for s in report.splits for lab, n in report.label_counts(s).items()]
        )
        st.altair_chart(
            alt.Chart(dist).mark_bar().encode(x="split:N", y="rows:Q", color="label:N", xOffset="label:N"),
            width="stretch",
        )
        dropped = pd.DataFrame([{"reason": k, "rows": v} for k, v in report.dropped.items()])
        c1, c2 = st.columns(2)
        c1.write(f"Rows read {report.rows_read}, kept {report.rows_kept}; dropped by reason:")
        c1.dataframe(dropped, hide_index=True)
        tokens = report.tokens
        c2.write("Token lengths")
        c2.dataframe(
            pd.DataFrame([{"statistic": k, "value": v} for k, v in tokens.items() if k != "model"]), hide_index=True
        )
    exports = data.exports(picked[1])
    st.subheader("Export variants")
    if not exports:
        st.write(f"Not exported yet: `raybm export --model {picked[1]}`.")
    else:
        rows = []
        ref = exports.get("reference") or {}
        rows.append(
            {
                "variant": "reference",
                "MB": round(ref.get("model_bytes", 0) / 1e6, 1),
                "accuracy": ref.get("accuracy"),
                "macro-F1": ref.get("f1_macro"),
                "p50 ms": ref.get("latency_p50_ms"),
            }
        )
        for v, m in exports["variants"].items():
            mm = m.get("measured") or {}
            rows.append(
                {
                    "variant": v,
                    "MB": round(m["model_bytes"] / 1e6, 1),
                    "accuracy": mm.get("accuracy"),
                    "macro-F1": mm.get("f1_macro"),
                    "p50 ms": mm.get("latency_p50_ms"),
                }
            )
        st.dataframe(pd.DataFrame(rows), hide_index=True)


def page_errors(data: DashboardData) -> None:
    """The Errors page: the test examples a model got wrong, most confident first."""
    import altair as alt
    import streamlit as st

    st.title("Errors")
    picked = _pick(data, (RUNS, SWEEPS), "errors")
    if not picked:
        return
    preds = data.predictions(*picked)
    info = data.model_info(*picked)
    if preds is None or not info["test"]:
        st.warning("No test predictions were saved for this job (older runs did not keep them).")
        return
    labels = list(info["test"]["per_class"])
    preds = preds.assign(true=[labels[i] for i in preds["label"]], predicted=[labels[i] for i in preds["pred"]])
    wrong = preds[preds["label"] != preds["pred"]]
    st.write(f"{len(wrong)} of {len(preds)} test examples misclassified.")
    c1, c2 = st.columns(2)
    true_f = c1.multiselect("True label", labels, default=labels, key="err_true")
    pred_f = c2.multiselect("Predicted label", labels, default=labels, key="err_pred")
    lo, hi = st.slider("Confidence", 0.0, 1.0, (0.0, 1.0), 0.01, key="err_conf")
    shown = wrong[wrong["true"].isin(true_f) & wrong["predicted"].isin(pred_f) & wrong["confidence"].between(lo, hi)]
    st.dataframe(
        shown[["text", "true", "predicted", "confidence"]].sort_values("confidence", ascending=False),
        hide_index=True,
        width="stretch",
    )

    if len(labels) == 2:
        st.subheader(f"Decision threshold for '{labels[1]}'")
        threshold = st.slider(
            f"Predict {labels[1]} when its probability is at least", 0.05, 0.95, 0.5, 0.01, key="threshold"
        )
        y, p = preds["label"].to_numpy(), preds["prob_1"].to_numpy()
        points = []
        for t in np.round(np.arange(0.05, 0.951, 0.01), 2):
            points.append({"threshold": float(t), **_pr(y, p, t)})
        now = _pr(y, p, threshold)
        c = st.columns(4)
        c[0].metric("precision", f"{now['precision']:.3f}")
        c[1].metric("recall", f"{now['recall']:.3f}")
        c[2].metric("F1", f"{now['f1']:.3f}")
        c[3].metric("accuracy", f"{now['accuracy']:.3f}")
        curve = pd.DataFrame(points).melt("threshold", ["precision", "recall", "f1"], "measure", "value")
        rule = alt.Chart(pd.DataFrame({"threshold": [threshold]})).mark_rule(color="gray").encode(x="threshold:Q")
        st.altair_chart(
            alt.Chart(curve).mark_line().encode(x="threshold:Q", y="value:Q", color="measure:N") + rule, width="stretch"
        )


def _pr(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, float]:
    pred = p >= t
    tp, fp, fn = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": float((pred == (y == 1)).mean())}


def main(argv: list[str] | None = None) -> None:
    """The dashboard: the page picked in the sidebar, any failure shown as one line."""
    import streamlit as st

    args = settings(argv)
    st.set_page_config(page_title="raybm", layout="wide")
    st.set_option("client.showErrorDetails", "none")  # however it was started: no traceback in the browser
    if not signed_in():
        return
    try:
        data = _data(args.root)
    except RaybmError as e:
        st.error(f"Cannot open the results root {args.root}: {e}")
        return
    page = st.sidebar.radio("Page", PAGES, key="page")
    st.sidebar.caption(f"Results: {args.root}")
    try:
        if page == PAGES[0]:
            page_jobs(data)
        elif page == PAGES[1]:
            page_sweep(data)
        elif page == PAGES[2]:
            page_model(data)
        elif page == PAGES[3]:
            page_errors(data)
        elif page == PAGES[4]:
            page_try(data, args.serve_url)
        else:
            page_live(args.serve_url)
    except RaybmError as e:
        st.error(str(e))
    except Exception as e:
        logging.getLogger("raybm.dashboard.pages").exception("the %s page failed", page)
        st.error(f"This page could not be shown ({type(e).__name__}). The dashboard's console log has the details.")


if __name__ == "__main__":  # `raybm dashboard` runs this file as the Streamlit script
    main()
