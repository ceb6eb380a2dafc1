"""Never measure the same thing twice: eval figures keyed by (model, texts, settings).

One entry is one language's texts measured on one model, `<workdir>/cache/eval/<key>.json`,
with key = sha256 of
    model     the fingerprint of the model's files (`model_fingerprint`: every file of a
              checkpoint folder, i.e. weights, config and tokenizer, or the GGUF file), so a
              retrained or edited model never hits an entry of its predecessor;
    texts     sha256 of the documents (`texts_fingerprint`), so changed data never hits either;
    settings  what changes the figures: the token cap, the window length, the dtype, and the
              layermoe version (a new version may define a figure differently).
Device and batch size are not in the key: they change float rounding, not what is measured.

An entry holds the bits-per-byte figures and, for an expanded model, the language's routing
counts with the generation they were labelled with; a lookup that needs the routing misses an
entry without it. `eval` (the model under test and the base model's figures) and `extend`'s
drift check measure through `measure_cached`, so the base model is measured once per language,
and the model before an extension is not measured again when its eval already did it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from layermoe import __version__
from layermoe.core.integrity import file_sha256
from layermoe.core.workdir import atomic_write_text
from layermoe.evaluation import LanguageEval, LanguageRouting, measure_languages
from layermoe.modeling.base import weights_sha256


def texts_fingerprint(texts: list[str]) -> str:
    """sha256 of the documents in order (each length-prefixed, so no two lists collide by concatenation)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def model_fingerprint(source, cache_dir: str | Path | None = None) -> str:
    """sha256 over the files a model is loaded from (their checksums are memoised per file).

    A checkpoint folder: every file in it (weights, config, tokenizer); a GGUF: the file; a hub
    id: the weight files of its cached snapshot.
    """

    if source.kind == "local":
        files = {p.name: file_sha256(p) for p in sorted(Path(source.path).iterdir())
                 if p.is_file() and not p.name.startswith(".")}
    else:
        files = weights_sha256(source, cache_dir)
    listing = "".join(f"{name}\0{digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


@dataclass
class EvalJob:
    """One thing to measure: a language's held-out texts, or a named test set."""

    name: str  # the language for held-out text; "LANG=SPEC" for a test set
    language: str
    texts: list[str]
    max_tokens: int | None = None
    routing: bool = False  # count the routing too (an expanded model's held-out text)
    generation: int | None = None  # the classifier's label for the routing counts

    @cached_property
    def texts_sha256(self) -> str:
        return texts_fingerprint(self.texts)


class ModelUnderTest:
    """A model to measure: its fingerprint without loading it, and the model itself once, on demand."""

    def __init__(self, label: str, source, loader: Callable[[str], tuple], cache_dir: Path | None = None,
                 dtype: str = "float32"):
        self.label = label  # how the manifest names it: "base", "g1/stage2", ...
        self.source = source  # a models.ModelSource
        self._loader = loader  # device -> (model, tokenizer), the model's weights in `dtype`
        self.dtype = dtype  # float32 | bfloat16: part of the cache key
        self._cache_dir = cache_dir
        self._fingerprint: str | None = None
        self._loaded: tuple | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.source, self._cache_dir)
        return self._fingerprint

    @property
    def expanded(self) -> bool:
        """A layermoe checkpoint (it has routers), read from config.json without loading the weights."""
        if self.source.kind != "local":
            return False
        try:
            config = json.loads((Path(self.source.path) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return config.get("model_type") == "layermoe"

    def load(self, device: str) -> tuple:
        if self._loaded is None:
            self._loaded = self._loader(device)
        return self._loaded

    def release(self) -> None:
        self._loaded = None


class EvalCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    @staticmethod
    def key(fingerprint: str, dtype: str, job: EvalJob) -> str:
        # The window length is the model's default (its config is part of the fingerprint).
        material = {"model": fingerprint, "language": job.language, "texts": job.texts_sha256,
                    "max_tokens": job.max_tokens, "dtype": dtype, "layermoe": __version__}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def lookup(self, fingerprint: str, dtype: str, job: EvalJob) -> dict | None:
        """The entry for `job` on that model in that dtype, or None (also when the job needs routing the entry lacks)."""
        path = self._path(self.key(fingerprint, dtype, job))
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # absent, or unreadable: measure again and overwrite it
        routing = entry.get("routing")
        if job.routing and (routing is None or routing.get("generation") != job.generation):
            return None
        return entry

    def store(self, fingerprint: str, dtype: str, job: EvalJob, figures: dict, routing: dict | None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = {"language": job.language, "texts_sha256": job.texts_sha256, "max_tokens": job.max_tokens,
                 "model": fingerprint, "dtype": dtype, "eval": figures,
                 "routing": None if routing is None else {"generation": job.generation, "counts": routing}}
        atomic_write_text(self._path(self.key(fingerprint, dtype, job)), json.dumps(entry) + "\n")


@dataclass
class Measured:
    evals: dict = field(default_factory=dict)  # job name -> evaluation.LanguageEval
    routing: dict = field(default_factory=dict)  # job name -> evaluation.LanguageRouting (routing jobs)
    measured: list[str] = field(default_factory=list)  # names measured now; the others came from the cache


def from_cache(cache: EvalCache, model: ModelUnderTest, jobs: list[EvalJob]) -> tuple[Measured, list[EvalJob]]:
    """The figures the cache holds for `jobs` on `model`, and the jobs it does not hold (nothing is loaded)."""

    found, missing = Measured(), []
    for job in jobs:
        entry = cache.lookup(model.fingerprint, model.dtype, job)
        if entry is None:
            missing.append(job)
            continue
        found.evals[job.name] = LanguageEval(**entry["eval"])
        if job.routing:
            found.routing[job.name] = LanguageRouting.from_dict(entry["routing"]["counts"])
    return found, missing


def measure_cached(cache: EvalCache, model: ModelUnderTest, jobs: list[EvalJob], *, device: str, force: bool = False,
                   progress: Callable[[str, int, int], None] | None = None) -> Measured:
    """Figures for every job: from the cache where the same model, texts and settings were measured
    before (unless `force`), else measured now, one forward pass per batch, and stored. The model
    is loaded only if something is missing."""

    result, missing = (Measured(), list(jobs)) if force else from_cache(cache, model, jobs)
    if not missing:
        return result
    loaded, tokenizer = model.load(device)
    for job in missing:
        measured = measure_languages(loaded, tokenizer, {job.name: job.texts}, max_tokens=job.max_tokens, device=device,
                                     progress=progress,
                                     routing_generation={job.name: job.generation} if job.routing else None)
        figures = measured.languages[job.name]
        routing = measured.routing.get(job.name)
        cache.store(model.fingerprint, model.dtype, job, figures.to_dict(), None if routing is None else routing.to_dict())
        result.evals[job.name] = figures
        if routing is not None:
            result.routing[job.name] = routing
        result.measured.append(job.name)
    # in the order of `jobs`, whatever came from where
    result.evals = {job.name: result.evals[job.name] for job in jobs}
    result.routing = {job.name: result.routing[job.name] for job in jobs if job.name in result.routing}
    return result
