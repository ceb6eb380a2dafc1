"""report.md from a G0 -> G1 -> G2 manifest with made-up numbers."""

from __future__ import annotations

import copy
import json
import re

import pytest

from layermoe.evaluation.report import generation_of_language, render_report

PNG = b"\x89PNG\r\n\x1a\n"


def _eval(languages: dict[str, float], **extra) -> dict:
    return {"status": "done", "languages": {l: {"bpb": v, "token_ppl": 2**v, "tokens": 1000} for l, v in languages.items()}, **extra}


ROUTING_G1 = {
    "current_generation": 1, "top_k": 2, "layers": [0, 1], "experts_per_layer": [3, 2],
    "expert_generations": [[0, 1, 1], [0, 1]], "classifier_layers": [1], "tokens": {"en": 500, "es": 400, "el": 300},
    "expert0_share": {"old": [0.8, 0.95], "new": [0.2, 0.1]},
    "router_expert0_share": {"old": [0.7, 0.6], "new": [0.1, 0.05]},
    "expert0_share_by_generation": {"0": [0.8, 0.95], "1": [0.2, 0.1]},
    "expert0_share_by_language": {"en": [0.8, 0.9], "es": [0.8, 1.0], "el": [0.2, 0.1]},
    "classifier_accuracy": {"old": [0.975], "new": [0.9], "all": [0.95]},
    "load": [[0.6, 0.25, 0.15], [0.7, 0.3]], "load_by_group": {"old": [[0.8, 0.1, 0.1], [0.9, 0.1]], "new": [[0.2, 0.5, 0.3], [0.1, 0.9]]},
    "note": "effective routing",
}

# G0 evaluated every language (the base model's figures); G1 taught el, hu; G2 taught bn, hi.
MANIFEST = {
    "schema_version": 2,
    "tool_version": "0.1.0",
    "base_model": {"spec": "models/tiny", "kind": "local", "sha256": {"model.safetensors": "ab" * 32}, "model_type": "qwen2", "num_layers": 2, "num_parameters": 123456},
    "generations": [
        {"index": 0, "new_languages": ["en", "es"],
         "eval": _eval({"en": 1.0, "es": 1.2, "el": 2.0, "hu": 2.2, "bn": 3.0, "hi": 3.4})},
        {"index": 1, "old_languages": ["en", "es"], "new_languages": ["el", "hu"],
         "profile": {"status": "done", "similarity": [0.5, 0.25], "outputs": {"plot": "g1/profile.png"}},
         "allocation": {"status": "done", "strategy": "layermoe", "budget": 6, "experts_per_layer": [2, 4], "new_experts_per_layer": [1, 3],
                        "classifier_layers": [1], "new_parameters": 4000, "uniform_new_parameters": 4000, "outputs": {"plot": "g1/allocation.png"}},
         "expansion": {"status": "done"}, "stage1": {"status": "done"}, "stage2": {"status": "done"},
         "eval": _eval({"en": 1.1, "es": 1.3, "el": 1.5, "hu": 1.7}, routing=ROUTING_G1, old_avg=1.2, new_avg=1.6, outputs={"routing_plot": "g1/routing.png"},
                       lm_eval={"results": {"arc_easy": {"acc,none": 0.25, "acc_stderr,none": 0.01}}})},
        {"index": 2, "old_languages": ["en", "es", "el", "hu"], "new_languages": ["bn", "hi"],
         "profile": {"status": "done", "similarity": [0.4, 0.2], "outputs": {"plot": "g2/profile.png"}},
         "allocation": {"status": "done", "strategy": "layermoe", "budget": 4, "experts_per_layer": [3, 5], "new_experts_per_layer": [1, 1],
                        "classifier_layers": [0], "new_parameters": 3000, "uniform_new_parameters": 2000, "outputs": {"plot": "g2/allocation.png"}},
         "expansion": {"status": "done"}, "stage1": {"status": "done"}, "stage2": {"status": "running"},
         "eval": _eval({"en": 1.15, "es": 1.3, "el": 1.6, "hu": 1.8, "bn": 2.5, "hi": 2.7},
                       routing={**ROUTING_G1, "current_generation": 2, "experts_per_layer": [3, 3], "classifier_routing": False, "load": [[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]]})},
    ],
}


def _validated(manifest: dict) -> dict:
    """Round-trip through the real manifest schema, as the CLI hands it over."""
    from layermoe.core.manifest import Manifest

    return Manifest.model_validate(manifest).model_dump(mode="json")


def _row(text: str, first_cell: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("work")
    for plot in ("g1/profile.png", "g1/allocation.png", "g2/profile.png"):  # g2/allocation.png is missing on purpose
        (workdir / plot).parent.mkdir(parents=True, exist_ok=True)
        (workdir / plot).write_bytes(PNG)
    text = render_report(_validated(copy.deepcopy(MANIFEST)), workdir)
    return workdir, text


def test_report_is_written_and_embeds_only_existing_plots(rendered):
    workdir, text = rendered
    assert (workdir / "report.md").read_text(encoding="utf-8") == text
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(embedded) == sorted(["g1/profile.png", "g1/allocation.png", "g2/profile.png", "bpb.png", "g1/routing.png", "g2/routing.png"])
    for path in embedded:
        assert (workdir / path).read_bytes()[:8] == PNG, path
    assert "plot `g2/allocation.png` not found" in text


def test_report_lineage_and_parameters(rendered):
    _, text = rendered
    assert "Base model: `models/tiny`, local, qwen2, 2 layers, 123,456 parameters." in text
    assert _row(text, "G0 (base)") == ["G0 (base)", "—", "en, es", "—", "—", "—", "—", "—", "done"]
    assert _row(text, "G2")[:2] == ["G2", "en, es, el, hu"] and _row(text, "G2")[7] == "running"
    params = [c for c in text.splitlines() if c.startswith("| G2 | layermoe")]
    assert params == ["| G2 | layermoe | 4 | 2 | 0 | 3,000 | 2,000 | 1.50× |"]
    assert "Experts per layer incl. expert 0 (Eq. 10): 2, 4 (Σ = 6)." in text
    assert "Similarity S^i per layer (Eq. 9): 0.500, 0.250." in text


def test_report_bits_per_byte_before_after_and_forgetting(rendered):
    _, text = rendered
    assert _row(text, "el") == ["el", "G1", "2.0000", "1.5000", "1.6000", "-0.4000"]
    assert _row(text, "bn") == ["bn", "G2", "3.0000", "—", "2.5000", "-0.5000"]
    assert _row(text, "en") == ["en", "G0", "1.0000", "1.1000", "1.1500", "+0.1500"]
    assert _row(text, "**mean G1**") == ["**mean G1**", "", "2.1000", "1.6000", "1.7000", ""]
    # G1: old = en, es; new = el, hu. Forgetting = mean(0.1, 0.1); gain = mean(0.5, 0.5).
    assert [r for r in text.splitlines() if r.startswith("| G1 | 1.")] == ["| G1 | 1.1000 → 1.2000 | 2.1000 → 1.6000 | +0.1000 | +0.1000 | +0.5000 |"]
    # G2: old = en, es, el, hu (rises 0.15, 0.1, -0.4, -0.4 against the base; 0.05, 0, 0.1, 0.1 against
    # the model after G1); new = bn, hi (drops 0.5, 0.7).
    assert [r for r in text.splitlines() if r.startswith("| G2 | 1.")] == ["| G2 | 1.6000 → 1.4625 | 3.2000 → 2.6000 | -0.1375 | +0.0625 | +0.6000 |"]


def test_report_routing_and_benchmarks(rendered):
    _, text = rendered
    assert "Tokens routed: en 500, es 400, el 300; top-2. Shares are of the effective routing" in text
    assert "top-2. The classifier does not decide routing in this model yet" in text
    assert "| 1 | 2 | 95.0% | 60.0% | 10.0% | 97.5% | 90.0% |" in text
    assert "| 0 | 3 | 80.0% | 70.0% | 20.0% |  |  |" in text
    assert "| arc_easy | acc | the task's own | 0.2500 |" in text
    assert "stderr" not in text


def test_generation_of_language_from_manifest():
    assert generation_of_language(MANIFEST) == {"en": 0, "es": 0, "el": 1, "hu": 1, "bn": 2, "hi": 2}


@pytest.mark.parametrize("cut", ["empty", "base_only", "pending_g1"])
def test_report_survives_missing_and_pending_steps(tmp_path, cut):
    manifest = copy.deepcopy(MANIFEST)
    if cut == "empty":
        manifest = {"schema_version": 2, "generations": []}
    elif cut == "base_only":
        manifest["generations"] = manifest["generations"][:1]
        manifest["generations"][0]["eval"] = {"status": "pending"}
    else:
        manifest["generations"] = manifest["generations"][:2]
        manifest["generations"][1] = {"index": 1, "old_languages": ["en", "es"], "new_languages": ["el"]}
    text = render_report(_validated(manifest) if cut != "empty" else manifest, tmp_path)
    assert text.startswith("# layermoe report\n")
    if cut == "empty":
        assert "_No base model recorded yet._" in text and "_No expansion generation yet._" in text
    if cut == "base_only":
        assert "_No evaluation yet: run `layermoe eval`._" in text and not (tmp_path / "bpb.png").exists()
    if cut == "pending_g1":
        assert _row(text, "G1")[3:] == ["pending"] * 6
        assert "_Profile pending._" in text and "_No routing record yet" in text
        assert (tmp_path / "bpb.png").exists()  # the base model's figures alone are still drawn
    json.dumps(manifest)  # the renderer must not have mutated it into something unserialisable


def test_report_says_the_few_shot_count_of_each_benchmark_figure(tmp_path):
    """One few-shot count per row is said once; figures scored with different counts each say their own."""
    manifest = copy.deepcopy(MANIFEST)
    scores = {"arc_hu": {"acc,none": 0.3}, "belebele_hun_Latn": {"acc,none": 0.4}}
    manifest["generations"][0]["eval"]["lm_eval"] = {"results": scores, "settings": {
        "arc_hu": {"num_fewshot": 25, "limit": None}, "belebele_hun_Latn": {"num_fewshot": 5, "limit": None}}}
    manifest["generations"][1]["eval"]["lm_eval"] = {"results": {task: {"acc,none": 0.5} for task in scores}, "settings": {
        "arc_hu": {"num_fewshot": 25, "limit": None}, "belebele_hun_Latn": {"num_fewshot": 0, "limit": None}}}
    render_report(_validated(manifest), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| arc_hu | acc | 25-shot | 0.3000 | 0.5000 |" in text
    assert "| belebele_hun_Latn | acc | varies | 0.4000 (5-shot) | 0.5000 (0-shot) |" in text
