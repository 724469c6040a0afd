"""The dashboard's Try it page: label typed or uploaded texts with a model from the
results, or with a running model server; uploads are checked for size and rows while
they are read, and every text for length."""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pandas as pd

from raybm.errors import RaybmError
from raybm.inference.explain import explain, strongest
from raybm.inference.loading import TextClassifier, load_predictor
from raybm.inference.predict import in_words
from raybm.serve.client import endpoint_ok, explain_text, post_texts

if TYPE_CHECKING:
    from raybm.dashboard.data import DashboardData

MAX_UPLOAD_ROWS = 5000
MAX_UPLOAD_MB = 5
MAX_TEXT_CHARS = 2000
Predict = Callable[[list[str]], pd.DataFrame]  # texts -> one row of answers each
Explain = Callable[[str], dict[str, Any]]  # a text -> its answer and each word's weight


def _predictor(path: str) -> TextClassifier:
    """The model's predictor, loaded once per session and model (Streamlit's cache)."""
    import streamlit as st

    @st.cache_resource(show_spinner="Loading the model ...", max_entries=2)
    def load(p: str) -> TextClassifier:
        return load_predictor(p, "auto", threads=max(1, min(4, os.cpu_count() or 1)))

    return load(path)


def page_try(data: DashboardData, serve_url: str | None) -> None:
    """The Try it page: label typed or uploaded texts with a model or a model server."""
    import altair as alt
    import streamlit as st

    from raybm.dashboard.data import read_upload

    st.title("Try it")
    found = _answerers(data, serve_url, st)
    if found is None:
        return
    predict, why = found
    st.subheader("Type or paste text")
    text = st.text_area("One text per line", key="try_text", height=120)
    if st.button("Predict", key="try_go"):
        texts = [t.strip() for t in text.splitlines() if t.strip()]
        if not texts:
            st.warning("Type at least one line of text first.")
        elif any(len(t) > MAX_TEXT_CHARS for t in texts):
            st.warning(f"Each line can be at most {MAX_TEXT_CHARS} characters.")
        else:
            _show(predict, texts, st, alt, why)

    st.subheader("Or upload a file")
    st.caption(f"CSV, TSV or JSONL, up to {MAX_UPLOAD_ROWS} rows; one column holds the text.")
    upload = st.file_uploader("File", type=["csv", "tsv", "jsonl", "txt"], key="try_file")
    if upload is not None:
        try:
            frame = read_upload(upload.name, upload.getvalue(), MAX_UPLOAD_ROWS, MAX_UPLOAD_MB * 1024 * 1024)
        except RaybmError as e:
            st.error(str(e))
            return
        columns = list(frame.columns)
        default = columns.index("text") if "text" in columns else 0
        column = st.selectbox("Text column", columns, index=default, key="try_column")
        if st.button("Label the file", key="try_file_go"):
            texts = frame[column].astype(str).tolist()
            empty = [i + 2 for i, t in enumerate(texts) if not t.strip()]
            if empty:
                st.error(f"Column {column!r} is empty on line(s) {empty[:10]} of the file; fill or remove them.")
                return
            long = [i + 2 for i, t in enumerate(texts) if len(t) > MAX_TEXT_CHARS]
            if long:
                st.error(
                    f"Column {column!r} has texts over {MAX_TEXT_CHARS} characters on line(s) {long[:10]}; "
                    f"shorten them, or label the file with `raybm predict --input`."
                )
                return
            out = _show(predict, texts, st, alt)
            if out is not None:
                labelled = frame.assign(
                    predicted_label=out["label"].to_numpy(), confidence=out["confidence"].to_numpy()
                )
                st.download_button(
                    "Download the labelled file (CSV)",
                    labelled.to_csv(index=False).encode("utf-8"),
                    file_name="labelled.csv",
                    mime="text/csv",
                    key="try_download",
                )


def _answerers(data: DashboardData, serve_url: str | None, st: ModuleType) -> tuple[Predict, Explain] | None:
    """(predict texts -> frame, explain one text) from the model server when it answers,
    else from a model the viewer picks; None when there is no model yet."""
    api_key = os.environ.get("RAYBM_API_KEY") or None
    if serve_url is not None and endpoint_ok(serve_url):
        url = serve_url
        st.success(f"Answers come from the model server at {serve_url}.")

        def predict(texts: list[str]) -> pd.DataFrame:
            answers = post_texts(url, texts, api_key)
            return pd.DataFrame(
                [
                    {
                        "text": t,
                        "answer": _words(a["label"], a["confidence"], a.get("uncertain")),
                        "label": a["label"],
                        "confidence": a["confidence"],
                        **{f"p({k})": v for k, v in a["probabilities"].items()},
                    }
                    for t, a in zip(texts, answers)
                ]
            )

        return predict, lambda text: explain_text(url, text, api_key)
    if serve_url:
        st.warning(
            f"The model server at {serve_url} does not answer; using a model loaded here instead. "
            f"Start it with `raybm serve` or check the address."
        )
    models = data.models()
    if not models:
        st.info(f"No trained model under {data.root} yet. Run `make demo` first.")
        return None
    titles = {choice: _title(data, choice) for choice in models}
    choice = st.selectbox(
        "Model",
        list(models),
        key="try_model",
        format_func=titles.get,
        help="Technical names: " + "; ".join(f"{titles[c]} = {c}" for c in models),
    )
    st.caption(f"Technical name: {choice}")

    def predict_here(texts: list[str]) -> pd.DataFrame:
        p = _predictor(data.local_model(models[choice]))
        probs = p.predict(texts)
        return pd.DataFrame(
            [
                {
                    "text": t,
                    "answer": _words(p.labels[int(r.argmax())], float(r.max())),
                    "label": p.labels[int(r.argmax())],
                    "confidence": float(r.max()),
                    **{f"p({lab})": float(v) for lab, v in zip(p.labels, r)},
                }
                for t, r in zip(texts, probs)
            ]
        )

    return predict_here, lambda text: explain(_predictor(data.local_model(models[choice])), text)


def _title(data: DashboardData, choice: str) -> str:
    """A model's readable name; its technical one when its records cannot be read."""
    try:
        return data.model_title(choice)
    except Exception:  # noqa: BLE001 - a picker entry never fails the page
        return choice


def knows_only(labels: list[str]) -> str:
    """What a viewer should know of any answer: the model picks one of its labels for every
    text, even for a text that is none of them, which then gets a low confidence."""
    if not labels:
        return ""
    names = ", ".join(labels[:-1]) + f" and {labels[-1]}" if len(labels) > 1 else labels[0]
    return (
        f"This model knows only {names}: every text gets one of them, a text that is none of them "
        f'too, so a low confidence or "uncertain" means it fits none well.'
    )


def _words(label: str, confidence: float, uncertain: bool | None = None) -> str:
    """The answer in words; a model server's abstain band decides ``uncertain``."""
    return in_words(label, confidence, 1.0 if uncertain else 0.0)


def highlighted(text: str, words: list[dict]) -> str:
    """``text`` as HTML (escaped) with each word's background by its weight: green where it
    pushed the answer, red where it pulled the other way, stronger the more it did."""
    top = max((abs(w["weight"]) for w in words), default=0.0) or 1.0
    out, at = [], 0
    for w in sorted(words, key=lambda w: w["start"]):
        out.append(html.escape(text[at : w["start"]]))
        share = min(1.0, abs(w["weight"]) / top)
        color = "0, 160, 60" if w["weight"] > 0 else "220, 40, 40"
        out.append(
            f'<span style="background: rgba({color}, {0.6 * share:.2f}); border-radius: 3px" '
            f'title="{w["weight"]:+.3f}">{html.escape(text[w["start"] : w["end"]])}</span>'
        )
        at = w["end"]
    out.append(html.escape(text[at:]))
    return "".join(out)


def _why(why: Explain, text: str, st: ModuleType) -> None:
    """The explanation of one answer: the text with its words highlighted."""
    try:
        found = why(text)
    except RaybmError as e:
        st.caption(f"No explanation: {e}")
        return
    pushed = strongest(found)
    st.markdown(
        "**Why:** "
        + (
            f"the words that pushed the answer most: {', '.join(pushed)}"
            if pushed
            else "no single word moves this answer"
        )
    )
    st.markdown(highlighted(text, found["words"]), unsafe_allow_html=True)  # every piece of the text is escaped
    st.caption(
        "Each word was hidden in turn and the text scored again: green words made the model surer of its "
        "answer, red ones less sure (occlusion)."
    )


def _show(
    predict: Predict, texts: list[str], st: ModuleType, alt: ModuleType, why: Explain | None = None
) -> pd.DataFrame | None:
    try:
        out = predict(texts)
    except RaybmError as e:
        st.error(str(e))
        return None
    except Exception as e:  # noqa: BLE001 - a viewer sees a sentence, not a stack trace
        st.error(f"The prediction failed ({type(e).__name__}). Check that the model folder is complete.")
        return None
    if len(out) == 1:
        answer = out.iloc[0]["answer"]
        (st.warning if answer.startswith("uncertain") else st.success)(f"Answer: {answer}")
        if why is not None:
            _why(why, texts[0], st)
    else:
        counts = out["label"].value_counts()
        st.success(f"{len(out)} texts: " + ", ".join(f"{n} {lab}" for lab, n in counts.items()))
    st.caption(knows_only([c[2:-1] for c in out.columns if c.startswith("p(")]))
    st.dataframe(out, hide_index=True, width="stretch")
    if len(out) == 1:
        probs = pd.DataFrame(
            [{"label": c[2:-1], "probability": out.iloc[0][c]} for c in out.columns if c.startswith("p(")]
        )
        st.altair_chart(alt.Chart(probs).mark_bar().encode(x="probability:Q", y="label:N"), width="stretch")
    else:
        counts = out["label"].value_counts().rename_axis("label").reset_index(name="texts")
        st.altair_chart(alt.Chart(counts).mark_bar().encode(x="texts:Q", y="label:N"), width="stretch")
    return out
