"""A checkpoint's tokenizer on disk: a folder `AutoTokenizer.from_pretrained` loads as it is, clean of
the machine it was written on and of the run that wrote it (the base tokenizer and an extended one alike)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# What loading or calling a tokenizer leaves in its saved config that is no property of the tokenizer:
# how this machine loaded it, and the truncation/padding of a run's last call (e.g. `max_length` =
# the training --seq-len). A checkpoint pushed to the hub must carry none of them.
LOCAL_SETTINGS = frozenset({"local_files_only", "is_local", "cache_dir", "token", "use_auth_token", "revision",
                            "subfolder", "trust_remote_code", "_commit_hash", "name_or_path", "force_download",
                            "proxies", "resume_download"})
CALL_SETTINGS = frozenset({"max_length", "stride", "truncation_strategy", "padding_strategy", "pad_to_multiple_of",
                           "pad_token_type_id", "truncation", "padding", "return_tensors"})


def clean_tokenizer_config(config: dict) -> dict:
    """`tokenizer_config.json` without local paths, loading options or a call's settings."""
    return {k: v for k, v in config.items() if k not in LOCAL_SETTINGS | CALL_SETTINGS}


def clean_tokenizer_json(tokenizer_json: dict) -> dict:
    """tokenizer.json without the truncation and padding a call left on the backend."""
    return {**tokenizer_json, "truncation": None, "padding": None}


def save_clean_tokenizer(tokenizer, out_dir: str | os.PathLike) -> Path:
    """`tokenizer.save_pretrained(out_dir)`, then its tokenizer_config.json and tokenizer.json cleaned
    (`clean_tokenizer_config`): what every checkpoint's tokenizer is saved with."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    config_path, json_path = out_dir / "tokenizer_config.json", out_dir / "tokenizer.json"
    if config_path.is_file():
        config = clean_tokenizer_config(json.loads(config_path.read_text(encoding="utf-8")))
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    if json_path.is_file():
        found = clean_tokenizer_json(json.loads(json_path.read_text(encoding="utf-8")))
        json_path.write_text(json.dumps(found, ensure_ascii=False), encoding="utf-8")
    return out_dir


def save_tokenizer(tokenizer_json: dict, out_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> Path:
    """Write tokenizer.json (plus the base folder's tokenizer_config.json/special_tokens_map.json/
    chat template, if given) so that `AutoTokenizer.from_pretrained(out_dir)` loads it verbatim.

    transformers 5 rebuilds model-specific classes (LlamaTokenizer, Qwen2Tokenizer, GPT2Tokenizer,
    GemmaTokenizer...) from vocab+merges with their own hard-coded normaliser/pre-tokeniser;
    `tokenizer_class: TokenizersBackend` makes it load tokenizer.json as it is.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {}
    if base_dir is not None:
        base_dir = Path(base_dir)
        for name in ("special_tokens_map.json", "chat_template.jinja", "chat_template.json"):
            if (base_dir / name).is_file() and base_dir.resolve() != out_dir.resolve():
                (out_dir / name).write_bytes((base_dir / name).read_bytes())
        if (base_dir / "tokenizer_config.json").is_file():
            config = json.loads((base_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config = {**clean_tokenizer_config(config), "tokenizer_class": "TokenizersBackend"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer.json").write_text(json.dumps(clean_tokenizer_json(tokenizer_json), ensure_ascii=False),
                                            encoding="utf-8")
    return out_dir
