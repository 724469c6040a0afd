"""The data stage: sources, cleaning, de-duplication, split, tokenization, report."""

from raybm.data.pipeline import PreparedData, load_split, run_data_stage
from raybm.data.report import format_report
from raybm.data.tokenizing import pad_collate, tokenize_dataset

__all__ = ["PreparedData", "format_report", "load_split", "run_data_stage", "pad_collate", "tokenize_dataset"]
