"""Process entry for one training stage, for `accelerate launch` / torchrun:

    accelerate launch --config_file recipes/accelerate/ddp.yaml \\
        -m layermoe.training.run_stage --args-json args.json

args.json: {"model_dir", "output_dir", "work_dir", "prepared_dir" (from `layermoe prepare`) or
"texts_by_language" (or "texts_json": a path to a JSON file holding it), "generation_of_language",
"current_generation", "config" (TrainConfig fields), optional "log_path", "result_json",
"show_progress"}.
The main process writes the TrainResult to result_json (default <work_dir>/train_result.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layermoe.core.errors import LayermoeError
from layermoe.training.config import TrainConfig
from layermoe.training.loop import train_stage


def run_from_args(args: dict):

    texts = args.get("texts_by_language")
    if texts is None and args.get("texts_json"):
        texts = json.loads(Path(args["texts_json"]).read_text(encoding="utf-8"))
    work_dir = Path(args["work_dir"])
    result = train_stage(
        model_dir=Path(args["model_dir"]),
        output_dir=Path(args["output_dir"]),
        texts_by_language=texts,
        generation_of_language={k: int(v) for k, v in args["generation_of_language"].items()},
        current_generation=int(args["current_generation"]),
        config=TrainConfig(**args["config"]),
        work_dir=work_dir,
        prepared_dir=Path(args["prepared_dir"]) if args.get("prepared_dir") else None,
        log_path=Path(args["log_path"]) if args.get("log_path") else None,
        show_progress=bool(args.get("show_progress", False)),
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        out = Path(args.get("result_json") or work_dir / "train_result.json")
        out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one layermoe training stage (see module docstring).")
    parser.add_argument("--args-json", required=True, type=Path)
    ns = parser.parse_args(argv)
    try:
        run_from_args(json.loads(ns.args_json.read_text(encoding="utf-8")))
    except LayermoeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
