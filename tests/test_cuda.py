"""The CUDA path: kernels, function preservation, decoding, a short bf16 chain, save/reload.

Run with `pytest -m cuda` on a machine with a GPU (`bench/gpu_suite.sh` does). Without CUDA
every test here is skipped, so CI stays green. `LAYERMOE_CUDA_TESTS_ON_CPU=1` runs the same
tests on the CPU with small shapes: that checks the tests' own logic where no GPU is at hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from layermoe.testing import make_tiny_tokenizer

ON_CPU = os.environ.get("LAYERMOE_CUDA_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="needs a CUDA device (pytest -m cuda on a GPU)"),
]

# bf16 keeps 8 mantissa bits; one bf16 GEMM chain is good to about 1% of the output's scale,
# a 30-layer model's logits to a few percent. fp32 must be exact up to rounding.
BF16_BLOCK_TOLERANCE = 2e-2
BF16_MODEL_TOLERANCE = 5e-2
FP32_PRESERVATION = 1e-4

# SmolLM2-135M's shapes (the demo model), random weights; a CPU check uses a narrow copy.
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                      rope_theta=100000.0, rms_norm_eps=1e-5)
CPU_SHAPES = dict(SMOLLM2_SHAPES, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512)


@pytest.fixture(scope="module")
def device() -> str:
    return "cpu" if ON_CPU and not torch.cuda.is_available() else "cuda"


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def smollm2_shaped(tmp_path_factory, device) -> Path:
    """A random-weight Llama at SmolLM2-135M's shapes, saved with a small tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    directory = tmp_path_factory.mktemp("cuda") / "smollm2-shaped"
    tokenizer = make_tiny_tokenizer()
    shapes = CPU_SHAPES if device == "cpu" else SMOLLM2_SHAPES
    config = LlamaConfig(**shapes, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # a shared direction, as trained hidden states have (cosines > 0)
        model.get_input_embeddings().weight.add_(0.05 * torch.randn(config.hidden_size))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------
# Expert kernels
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "new_experts,top_k,classes",
    [([2, 0, 3], 2, 0), ([1], 3, 0), ([2, 3], 2, 3), ([2, 3], 3, 2)],
    ids=["empty-generation", "k-clipped", "3-class", "binary-k3"],
)
def test_grouped_and_loop_experts_agree(device, dtype, new_experts, top_k, classes):
    from test_modeling import dense_reference, make_block, run_block

    block = make_block(new_experts, top_k, classes, hidden=64, inter=128)
    x = torch.randn(4, 37, 64, generator=torch.Generator().manual_seed(1))
    x[..., 0] = 3.0
    with torch.no_grad():
        if sum(new_experts) >= 3:  # the last expert loses for every token: an empty group member
            block.router.weight[-1].zero_()
            block.router.weight[-1, 0] = -50.0
        reference = dense_reference(block, x)
        block.to(device=device, dtype=dtype)
        xd = x.to(device=device, dtype=dtype)
        grouped = run_block(block, xd, "grouped").float().cpu()
        loop = run_block(block, xd, "loop").float().cpu()
    if dtype == torch.float32:
        assert (grouped - reference).abs().max().item() < 1e-4
        assert (loop - reference).abs().max().item() < 1e-4
    else:
        assert relative_error(grouped, reference) < BF16_BLOCK_TOLERANCE
        assert relative_error(loop, reference) < BF16_BLOCK_TOLERANCE


# ---------------------------------------------------------------------------------------
# Function preservation, decoding, save/reload
# ---------------------------------------------------------------------------------------
def _upcycled(path: Path, device: str, dtype):
    from transformers import AutoModelForCausalLM

    from layermoe.modeling import upcycle

    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    layers = base.config.num_hidden_layers
    new_experts = [(i % 4) for i in range(layers)]  # 0..3 new experts: dense layers included
    classifier_layers = [i for i in range(layers) if new_experts[i]][:3]
    return base, upcycle(base, new_experts, classifier_layers=classifier_layers).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_expand_preserves_the_base_models_logits(smollm2_shaped, device, dtype):
    base, model = _upcycled(smollm2_shaped, device, dtype)
    ids = torch.randint(2, 500, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        want, got = base(ids).logits.float(), model(ids).logits.float()
    if dtype == torch.float32:
        assert (got - want).abs().max().item() <= FP32_PRESERVATION
    else:
        assert relative_error(got, want) < BF16_MODEL_TOLERANCE


def test_greedy_decoding_with_kv_cache_gives_the_base_models_tokens(smollm2_shaped, device):
    base, model = _upcycled(smollm2_shaped, device, torch.float32)
    prompt = torch.randint(2, 500, (2, 12), generator=torch.Generator().manual_seed(3)).to(device)
    settings = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=1)
    want = base.generate(prompt, **settings)
    got = model.generate(prompt, use_cache=True, **settings)
    assert torch.equal(got, want)


def test_save_and_reload_give_the_same_logits(smollm2_shaped, device, tmp_path):
    from layermoe.modeling import load_layermoe, save_layermoe

    _, model = _upcycled(smollm2_shaped, device, torch.bfloat16)
    save_layermoe(model, tmp_path / "saved")
    again = load_layermoe(tmp_path / "saved", device=device, dtype=torch.bfloat16)
    ids = torch.randint(2, 500, (2, 40), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


# ---------------------------------------------------------------------------------------
# A short lineage in bf16 through the CLI: G0 → G1 → G2
# ---------------------------------------------------------------------------------------
def _cli(workdir: Path, *args: str):
    from layermoe.cli import app

    result = CliRunner().invoke(app, ["-w", str(workdir), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"layermoe {' '.join(args)}:\n{result.output}"
    return result


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_bf16_chain_to_g2_keeps_frozen_weights(tmp_path, device):
    from layermoe.core.workdir import Workdir
    from layermoe.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", "qwen2", num_layers=4, shared_direction=0.05, hidden_size=64,
                            intermediate_size=128)
    run = tmp_path / "run"
    on = ["--device", device]
    train = ["--precision", "bf16", "--seq-len", "64", "--micro-batch", "4", "--lr", "1e-3", "--checkpoint-every", "5"]
    _cli(run, "profile", "--model", str(model), "--old", "en", "--new", "el,hu", "--tokens", "2000", *on, "--dtype", "bfloat16")
    _cli(run, "allocate", "--budget", "10", "--classifier-layers", "1")
    _cli(run, "expand", *on)
    _cli(run, "train", "--stage", "1", "--max-steps", "20", *train)
    _cli(run, "train", "--stage", "2", "--max-steps", "10", *train)
    _cli(run, "eval", "--max-tokens", "500", *on)
    _cli(run, "extend", "--new", "tr", "--budget", "8", "--tokens", "2000", "--drift-tokens", "300", *on)
    _cli(run, "train", "--stage", "1", "--max-steps", "10", *train)
    _cli(run, "train", "--stage", "2", "--max-steps", "5", *train)
    _cli(run, "eval", "--max-tokens", "500", *on)

    manifest = Workdir(run).load()
    g1, g2 = manifest.generations[1], manifest.generations[2]
    assert all(g.step(s).status.value == "done" for g in (g1, g2) for s in ("expansion", "stage1", "stage2", "eval"))
    assert g2.stage1.metrics["data"]["tokens_per_language"]["tr"] > 0
    # Everything G2 must not touch is bit-identical to G1's final model: embeddings, attention,
    # norms, expert 0 and G1's experts (routers and classifiers do train in G2).
    before, after = _weights(run / g1.stage2.checkpoint), _weights(run / g2.stage2.checkpoint)
    frozen = [n for n in before if ".router." not in n and ".classifier." not in n]
    assert any(".experts.g1." in n for n in frozen) and any(".expert0." in n for n in frozen)
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(_weights(run / g2.expansion.checkpoint)[n], after[n]) for n in after if ".experts.g2." in n)
    figures = g2.eval.languages
    assert set(figures) == {"en", "el", "hu", "tr"} and all(r.bpb > 0 for r in figures.values())
    # eval's --dtype auto: bfloat16 weights on CUDA (float32 on CPU); the drift check follows G1's eval
    expected = "bfloat16" if device.startswith("cuda") else "float32"
    assert g1.eval.config["dtype"] == g2.eval.config["dtype"] == g2.expansion.metrics["drift_dtype"] == expected


# ---------------------------------------------------------------------------------------
# FSDP2 with one process, through accelerate launch: the code path of a multi-GPU run
# ---------------------------------------------------------------------------------------
def test_fsdp2_with_one_process_equals_a_plain_run(tmp_path, device):
    import json
    import subprocess
    import sys

    from test_distributed import _LAUNCHED_RUN
    from test_training import GENS, REPO, _corpus, _env, _expanded, _free_port, _small_config
    from test_training import _weights as weights_of

    from layermoe.training.loop import train_stage

    expanded = _expanded(tmp_path, hidden_size=64, intermediate_size=128)
    train, _ = _corpus(40)
    config = _small_config(1, max_steps=4, micro_batch_size=2, precision="fp32")
    script = tmp_path / "launched_run.py"
    script.write_text(_LAUNCHED_RUN)
    args = tmp_path / "args.json"
    args.write_text(json.dumps(dict(model_dir=str(expanded), output_dir=str(tmp_path / "fsdp_out"), texts=train, gens=GENS,
                                    config=config.model_dump(mode="json"), work_dir=str(tmp_path / "fsdp_work"),
                                    result=str(tmp_path / "fsdp_result.json"))))
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO / "recipes/accelerate/fsdp2.yaml"), "--num_processes", "1", "--main_process_port",
                          str(_free_port()), str(script), str(args)], env=_env(), capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "fsdp_result.json").read_text())
    assert result["distributed"]["type"] == "FSDP" and result["distributed"]["sharded_parameters"] > 0
    train_stage(expanded, tmp_path / "plain_out", train, GENS, 1, config, tmp_path / "plain_work")
    got, want = weights_of(tmp_path / "fsdp_out"), weights_of(tmp_path / "plain_out")
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=1e-5), name
