"""Loads the tiny multiple-choice task from the JSON lines file next to this one (no network)."""

from pathlib import Path


def tiny_mc(**kwargs):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("tiny_mc.jsonl"))})
