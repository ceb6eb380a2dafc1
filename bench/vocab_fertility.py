"""Bytes per token before and after `--new-tokens N`, per language, for the demo's two generations.

No model is trained: this runs the vocabulary step alone (`layermoe.vocabulary.extend_tokenizer`)
on a base tokenizer and the builtin corpus, the way `extend --new-tokens N` does: G1 = el, hu, tr
after en, then G2 = bn, hi, mr on top of G1's tokenizer, learning from each language's training
split and measuring on its held-out split (never learned from), with every old language's
held-out and training documents checked unchanged:

    python bench/vocab_fertility.py [--model demo] [--new-tokens 8000] [--attach-marks]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from layermoe.data import load_texts
from layermoe.modeling.base import load_model, resolve_model_spec
from layermoe.vocabulary.extension import extend_tokenizer
from layermoe.vocabulary.counting import tokenizer_from_json

GENERATIONS = ([["en"], ["el", "hu", "tr"]], [["en", "el", "hu", "tr"], ["bn", "hi", "mr"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--new-tokens", type=int, default=8000)
    parser.add_argument("--attach-marks", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        _, tokenizer = load_model(resolve_model_spec(args.model), cache_dir=cache)
    current = json.loads(tokenizer.backend_tokenizer.to_str())
    current["truncation"] = current["padding"] = None
    rows = []
    for index, (old, new) in enumerate(GENERATIONS, start=1):
        result = extend_tokenizer(
            current,
            {lang: load_texts(lang, "builtin", split="train") for lang in new},
            {lang: load_texts(lang, "builtin", split="heldout") + load_texts(lang, "builtin", split="train")
             for lang in old},
            args.new_tokens, heldout_texts={lang: load_texts(lang, "builtin", split="heldout") for lang in new},
            attach_marks=args.attach_marks)
        report = result.report
        print(f"G{index}: {report.new_tokens:,} new tokens ({report.new_characters} new characters, "
              f"{report.rejected_by_old_languages:,} candidates refused to keep the old languages' tokens); "
              f"old documents unchanged: {report.old_docs_unchanged:,} of {report.old_docs_checked:,} "
              f"({report.old_unchanged_share:.2%})")
        for lang in new:
            held = report.languages[lang]["heldout"]
            rows.append((f"G{index}", lang, held["bytes_per_token_before"], held["bytes_per_token_after"], held["ratio"]))
        current = result.tokenizer_json
        tokenizer_from_json(current)  # loads as a tokenizer
    print("\n| generation | language | bytes/token before | after | ratio |\n|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]:.2f} | {row[3]:.2f} | {row[4]:.2f}× |")


if __name__ == "__main__":
    main()
