"""The manifest: round trip, migration, schema errors, atomic writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layermoe.core.errors import LayermoeError
from layermoe.core.manifest import (
    SCHEMA_VERSION,
    BaseModelRecord,
    Generation,
    LanguageEval,
    Manifest,
    StepStatus,
    parse_manifest,
)
from layermoe.core.workdir import Workdir, atomic_write_text

DATA = Path(__file__).parent / "data"


def sample_manifest() -> Manifest:
    manifest = Manifest(base_model=BaseModelRecord(spec="../models/tiny", kind="local", path="../models/tiny"),
                        generations=[Generation(index=0, new_languages=["en"]),
                                     Generation(index=1, old_languages=["en"], new_languages=["el", "tr"])])
    g1 = manifest.generations[1]
    g1.profile.similarity = [0.5, 0.25, 0.125]
    g1.allocation.experts_per_layer = [3, 2, 1]
    g1.allocation.classifier_layers = [0]
    g1.eval.languages["el"] = LanguageEval(bpb=1.25, tokens=10)
    g1.profile.status = StepStatus.done
    return manifest


def test_round_trip_keeps_every_field(tmp_path):
    workdir = Workdir(tmp_path)
    manifest = sample_manifest()
    workdir.save(manifest)
    loaded = workdir.load()
    assert loaded.model_dump(mode="json") == json.loads(manifest.to_json())
    g1 = loaded.generations[1]
    assert g1.profile.similarity == [0.5, 0.25, 0.125]
    assert g1.allocation.experts_per_layer == [3, 2, 1]
    assert g1.allocation.classifier_layers == [0]
    assert g1.eval.languages["el"].bpb == 1.25
    assert loaded.current.index == 1
    assert loaded.generation_of_language() == {"en": 0, "el": 1, "tr": 1}


def test_unknown_fields_survive_a_round_trip(tmp_path):
    data = json.loads(sample_manifest().to_json())
    data["generations"][1]["profile"]["from_the_future"] = [1, 2]
    manifest = parse_manifest(json.dumps(data))
    assert json.loads(manifest.to_json())["generations"][1]["profile"]["from_the_future"] == [1, 2]


def test_older_manifest_is_migrated():
    manifest = parse_manifest((DATA / "manifest_v1.json").read_text())
    assert manifest.schema_version == SCHEMA_VERSION
    allocation = manifest.generations[1].allocation
    assert allocation.budget == 8  # v1 called it `delta`
    assert "delta" not in allocation.model_dump()
    assert allocation.experts_per_layer == [2, 2, 2, 2]


def test_newer_manifest_is_refused():
    data = json.loads(sample_manifest().to_json())
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(LayermoeError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this layermoe"):
        parse_manifest(json.dumps(data))


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"generations": []}', "has no integer schema_version"),
        (f'{{"schema_version": {SCHEMA_VERSION}, "generations": [{{"index": "x"}}]}}', "at `generations.0.index`"),
    ],
)
def test_bad_manifests_give_one_line(text, message):
    with pytest.raises(LayermoeError, match=message) as info:
        parse_manifest(text)
    assert "\n" not in str(info.value)


def test_crash_mid_write_leaves_previous_manifest(tmp_path):
    """A writer killed between writing the temp file and the rename leaves the old manifest intact."""
    workdir = Workdir(tmp_path)
    workdir.save(sample_manifest())
    before = workdir.manifest_path.read_bytes()
    script = f"""
import os, layermoe.core.workdir as w
real_replace = os.replace
def die(*a, **k):
    os._exit(9)   # the process dies after the temp file is written, before the rename
os.replace = die
w.atomic_write_text(w.Path({str(workdir.manifest_path)!r}), "half" * 1000)
"""
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == 9
    assert workdir.manifest_path.read_bytes() == before
    assert workdir.load().generations[1].profile.similarity == [0.5, 0.25, 0.125]


def test_atomic_write_cleans_its_temp_file_on_error(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    atomic_write_text(target, "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
