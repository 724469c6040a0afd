"""Small data the tests share."""

import pandas as pd


def make_frame(n_per_class=40):
    """A two-class review table (columns body and sentiment), ``n_per_class`` rows a class,
    every text different; the negative ones carry HTML for the cleaning to remove."""
    rows = []
    for i in range(n_per_class):
        rows.append({"body": f"I really liked item number {i}, great stuff", "sentiment": "pos"})
        rows.append({"body": f"Item {i} was a disappointment, <i>avoid</i>", "sentiment": "neg"})
    return pd.DataFrame(rows)
