"""recipes/paper/: each recipe's resolved settings against the authors' published values.

The table below was read off the authors' repository (github.com/XZhang00/LayerMoE, commit a76c077,
2025-06-11; Q = layermoe-qwen/scripts-train/, L = layermoe-llama/scripts-train/) and, for the loss
code their repository does not carry, MoE-LPR's (github.com/zjwang21/MoE-LPR, commit e228c55), which
LayerMoE's README says it modifies. Each row: recipe, generation, the setting as layermoe resolves
it, the authors' value, where it is written. A global batch is per-device batch x accumulation x GPUs.
"""

from __future__ import annotations

import pytest

from layermoe.allocation.strategies import parse_layer_list
from layermoe.pipeline.recipes import load_recipe

QWEN_G1 = [5, 4, 3, 5, 4, 3, 2, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 3, 3]
QWEN_G2_TOTALS = [10, 8, 6, 9, 8, 5, 3, 5, 5, 4, 3, 3, 3, 3, 3, 3, 3, 5, 5, 6, 6, 6, 4, 4]
LLAMA_G1 = [5, 5, 5, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4]

# (recipe, generation index in the recipe, setting, authors' value, source)
AUTHORS = [
    # ---- Qwen1.5-1.8B, G1
    ("qwen1.5-1.8b-g1", 0, "allocate.experts_per_layer", QWEN_G1, "Q/stage1-6B-layermoe-g1.sh:31 --ada_moe_num_experts_list"),
    ("qwen1.5-1.8b-g1", 0, "allocate.classifier_at", [5, 6, 10, 11, 12, 13, 23], "Q/stage2-6B-layermoe-g1.sh:27 --group_nums 0,0,0,0,0,2,2,0,0,0,2,2,2,2,0,...,2"),
    ("qwen1.5-1.8b-g1", 0, "expand.top_k", 2, "Q/stage1-6B-layermoe-g1.sh:30 --topk 2"),
    ("qwen1.5-1.8b-g1", 0, "stage1.alpha", 0.01, "Q/stage1-6B-layermoe-g1.sh:32 --aux_loss_coef 0.01"),
    ("qwen1.5-1.8b-g1", 0, "stage1.balance_form", "mixtral", "MoE-LPR modeling_qwen2.py:1167,1202: top-k counts not divided by k"),
    ("qwen1.5-1.8b-g1", 0, "stage1.learning_rate", 5e-5, "Q/stage1-6B-layermoe-g1.sh:46 --learning_rate 5e-5"),
    ("qwen1.5-1.8b-g1", 0, "stage1.lr_schedule", "cosine", "Q/stage1-6B-layermoe-g1.sh:42 --lr_scheduler_type cosine"),
    ("qwen1.5-1.8b-g1", 0, "stage1.epochs", 1.0, "Q/stage1-6B-layermoe-g1.sh:47 --num_train_epochs 1.0"),
    ("qwen1.5-1.8b-g1", 0, "stage1.precision", "bf16", "Q/stage1-6B-layermoe-g1.sh:49 --bf16"),
    ("qwen1.5-1.8b-g1", 0, "stage1.seq_len", 1024, "Q/stage1-6B-layermoe-g1.sh:37 --cutoff_len 1024"),
    ("qwen1.5-1.8b-g1", 0, "stage1.global_batch_sequences", 8 * 8 * 8, "Q/stage1-6B-layermoe-g1.sh:9,24,40-41: 8 GPUs x 8 x GA 8"),
    ("qwen1.5-1.8b-g1", 0, "stage1.seed", 42, "Q/stage1-6B-layermoe-g1.sh:26 --data_seed 42"),
    ("qwen1.5-1.8b-g1", 0, "stage1.data.tokens_per_language", 2_000_000_000, "data/CulturaX-pre.py:51 tokens_num=2e9"),
    ("qwen1.5-1.8b-g1", 0, "stage2.beta", 0.1, "Q/stage2-6B-layermoe-g1.sh:32 --lpr_loss_coef 0.1"),
    ("qwen1.5-1.8b-g1", 0, "stage2.lpr_form", "authors", "MoE-LPR modeling_qwen2.py:1118-1127: CrossEntropyLoss on softmax probabilities"),
    ("qwen1.5-1.8b-g1", 0, "stage2.gamma", 0.1, "Q/stage2-6B-layermoe-g1.sh:31 --classify_loss_coef 0.1"),
    ("qwen1.5-1.8b-g1", 0, "stage2.learning_rate", 5e-5, "Q/stage2-6B-layermoe-g1.sh:49 --learning_rate 5e-5"),
    ("qwen1.5-1.8b-g1", 0, "stage2.seq_len", 512, "Q/stage2-6B-layermoe-g1.sh:40 --cutoff_len 512"),
    ("qwen1.5-1.8b-g1", 0, "stage2.global_batch_sequences", 8 * 24 * 4, "Q/stage2-6B-layermoe-g1.sh:21,43-44: 8 GPUs x 24 x GA 4"),
    ("qwen1.5-1.8b-g1", 0, "stage2.data.docs_per_new_language", 100_000, "Q/stage2-6B-layermoe-g1.sh:37 --max_samples 100000"),
    ("qwen1.5-1.8b-g1", 0, "stage2.data.docs_per_old_language", 50_000, "Q/stage2-6B-layermoe-g1.sh:17 DATASET=...,en50k,zh50k,es50k"),
    ("qwen1.5-1.8b-g1", 0, "profile.tokens", 100_000, "similarity/cal-similarity-tokens_dense.py:28-29,79 tokens_select = 100000"),
    ("qwen1.5-1.8b-g1", 0, "profile.document_order", "file", "similarity/cal-similarity-tokens_dense.py:36-42: documents read in file order"),
    ("qwen1.5-1.8b-g1", 0, "profile.long_documents", "truncate", "similarity/cal-similarity-tokens_dense.py:63 truncation=True"),
    ("qwen1.5-1.8b-g1", 0, "profile.max_document_tokens", 10_000, "similarity/cal-similarity-tokens_dense.py:63 max_length=10000"),
    ("qwen1.5-1.8b-g1", 0, "profile.include_bos", True, "similarity/cal-similarity-tokens_dense.py:63: default special tokens (Llama's BOS)"),
    # ---- Qwen1.5-1.8B, G2 on top of G1
    ("qwen1.5-1.8b-g2", 0, "allocate.experts_per_layer", QWEN_G1, "Q/stage1-12B-layermoe-g2_base_g1.sh:22 OLD_PATH=...6B-layermoe-g1-stage2"),
    ("qwen1.5-1.8b-g2", 1, "allocate.total_experts_per_layer", QWEN_G2_TOTALS, "Q/stage1-12B-layermoe-g2_base_g1.sh:34 --ada_moe_num_experts_list"),
    ("qwen1.5-1.8b-g2", 1, "allocate.classifier_at", [6, 10, 11, 12, 23], "Q/stage2-12B-layermoe-g2_base_g1.sh:27 --group_nums"),
    ("qwen1.5-1.8b-g2", 1, "expand.classifier", "binary", "Q/stage2-12B-layermoe-g2_base_g1.sh:27: 2 classes (G0 vs the rest)"),
    ("qwen1.5-1.8b-g2", 1, "expand.router_init", "reinit", "peft save_and_load.py:279,289-290; moe/layer.py:59,84 xavier_normal_"),
    ("qwen1.5-1.8b-g2", 1, "stage1.global_batch_sequences", 8 * 4 * 16, "Q/stage1-12B-layermoe-g2_base_g1.sh:9,43-44: 8 GPUs x 4 x GA 16"),
    ("qwen1.5-1.8b-g2", 1, "stage1.seq_len", 1024, "Q/stage1-12B-layermoe-g2_base_g1.sh:40 --cutoff_len 1024"),
    ("qwen1.5-1.8b-g2", 1, "stage1.alpha", 0.01, "Q/stage1-12B-layermoe-g2_base_g1.sh:35 --aux_loss_coef 0.01"),
    ("qwen1.5-1.8b-g2", 1, "stage2.global_batch_sequences", 8 * 20 * 4, "Q/stage2-12B-layermoe-g2_base_g1.sh:21,43-44: 8 GPUs x 20 x GA 4"),
    ("qwen1.5-1.8b-g2", 1, "stage2.seq_len", 512, "Q/stage2-12B-layermoe-g2_base_g1.sh:40 --cutoff_len 512"),
    ("qwen1.5-1.8b-g2", 1, "stage2.lpr_tokens", "g0", "data/data-12B/dataset_info.json:11-15,20-24: el, hu, tr tagged \"new\""),
    ("qwen1.5-1.8b-g2", 1, "stage2.data.docs_per_new_language", 100_000, "Q/stage2-12B-layermoe-g2_base_g1.sh:38 --max_samples 100000"),
    ("qwen1.5-1.8b-g2", 1, "stage2.data.replay_docs_by_generation", {0: 50_000, 1: 100_000}, "Q/stage2-12B-layermoe-g2_base_g1.sh:18,38 DATASET=bn2b,...,tr2b,en50k,zh50k,es50k"),
    # ---- Llama-3.2-3B, G1
    ("llama-3.2-3b-g1", 0, "allocate.experts_per_layer", LLAMA_G1, "L/G1-stage1-6B-my-8GPUs.sh:31 --ada_moe_num_experts_list"),
    ("llama-3.2-3b-g1", 0, "allocate.classifier_at", [], "L/G1-stage2-6B-my-8GPUs-no_cls.sh: no --group_nums (the only Llama stage 2 published)"),
    ("llama-3.2-3b-g1", 0, "stage1.global_batch_sequences", 8 * 4 * 16, "L/G1-stage1-6B-my-8GPUs.sh:10,40-41: 8 GPUs x 4 x GA 16"),
    ("llama-3.2-3b-g1", 0, "stage1.seq_len", 1024, "L/G1-stage1-6B-my-8GPUs.sh:37 --cutoff_len 1024"),
    ("llama-3.2-3b-g1", 0, "stage1.alpha", 0.01, "L/G1-stage1-6B-my-8GPUs.sh:32 --aux_loss_coef 0.01"),
    ("llama-3.2-3b-g1", 0, "stage1.learning_rate", 5e-5, "L/G1-stage1-6B-my-8GPUs.sh:46 --learning_rate 5e-5"),
    ("llama-3.2-3b-g1", 0, "stage2.global_batch_sequences", 8 * 20 * 4, "L/G1-stage2-6B-my-8GPUs-no_cls.sh:21,38-39: 8 GPUs x 20 x GA 4"),
    ("llama-3.2-3b-g1", 0, "stage2.seq_len", 512, "L/G1-stage2-6B-my-8GPUs-no_cls.sh:35 --cutoff_len 512"),
    ("llama-3.2-3b-g1", 0, "stage2.beta", 0.1, "L/G1-stage2-6B-my-8GPUs-no_cls.sh:27 --lpr_loss_coef 0.1"),
    ("llama-3.2-3b-g1", 0, "stage2.data.docs_per_new_language", 100_000, "L/G1-stage2-6B-my-8GPUs-no_cls.sh:32 --max_samples 100000"),
    # ---- Llama-3.2-3B, G2: not published; the recipe applies the Qwen G2 procedure (its header says so)
    ("llama-3.2-3b-g2", 0, "allocate.experts_per_layer", LLAMA_G1, "as llama-3.2-3b-g1"),
    ("llama-3.2-3b-g2", 1, "expand.router_init", "reinit", "not published: Qwen G2's (peft save_and_load.py:279,289-290)"),
    ("llama-3.2-3b-g2", 1, "stage2.global_batch_sequences", 640, "not published: Qwen G2's and Llama G1's stage 2 (640 x 512)"),
    ("llama-3.2-3b-g2", 1, "stage2.lpr_tokens", "g0", "not published: Qwen G2's (data/data-12B/dataset_info.json)"),
]


def _resolve(recipe_name: str, generation: int, setting: str):
    value = load_recipe(f"paper/{recipe_name}").generations[generation]
    for part in setting.split("."):
        value = getattr(value, part)
    if setting.endswith(("experts_per_layer", "classifier_at")):
        value = parse_layer_list(value, setting)
    return value


@pytest.mark.parametrize("recipe, generation, setting, authors, source", AUTHORS,
                         ids=[f"{r}-G{g + 1}-{s}" for r, g, s, _, _ in AUTHORS])
def test_paper_recipe_setting_is_the_authors(recipe, generation, setting, authors, source):
    assert _resolve(recipe, generation, setting) == authors, source


def test_the_published_totals_are_the_papers_budgets():
    assert sum(QWEN_G1) == 72 and sum(LLAMA_G1) == 84  # 24 + 48 new, 28 + 56 new
    assert sum(QWEN_G2_TOTALS) == 120 and all(t >= g + 1 for t, g in zip(QWEN_G2_TOTALS, QWEN_G1))  # 48 more


def test_every_paper_recipe_loads_and_names_its_source():
    from layermoe.pipeline.recipes import RECIPES_DIR, shipped

    names = sorted(n for n in shipped() if n.startswith("paper/"))
    assert names == ["paper/llama-3.2-3b-g1", "paper/llama-3.2-3b-g2", "paper/qwen1.5-1.8b-g1", "paper/qwen1.5-1.8b-g2"]
    for name in names:
        text = (RECIPES_DIR / f"{name}.yaml").read_text()
        assert "github.com/XZhang00/LayerMoE" in text and "tests/test_paper_recipes.py" in text
        assert load_recipe(name).generations[0].old == ["en", "zh", "es"]
