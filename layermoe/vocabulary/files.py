"""The extended tokenizer on disk: a folder `AutoTokenizer.from_pretrained` loads as it is."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Integration helpers


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
            if (base_dir / name).is_file():
                (out_dir / name).write_bytes((base_dir / name).read_bytes())
        if (base_dir / "tokenizer_config.json").is_file():
            config = json.loads((base_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "TokenizersBackend"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    return out_dir
