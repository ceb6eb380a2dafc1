"""Tiny random models of every supported family, built offline, for tests and benchmarks.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on the
embedded corpus in well under a second, and the weights are random.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from layermoe.data import builtin_corpus_path

# hidden 32, 2 layers unless asked: small enough that a forward pass costs microseconds.
_COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=8),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "gemma": dict(model_type="gemma", head_dim=8, hidden_act="gelu_pytorch_tanh"),
    "gemma2": dict(model_type="gemma2", head_dim=8, query_pre_attn_scalar=8, sliding_window=64),
}

TINY_FAMILIES = tuple(FAMILY_CONFIGS)


def _tokenizer_corpus() -> list[str]:
    """A few hundred sentences in several scripts, so every test language tokenizes sensibly."""

    wanted = {"en", "el", "hu", "tr", "bn", "hi", "mr", "zh", "es"}
    lines = []
    with open(builtin_corpus_path(), encoding="utf-8") as f:
        for line in f:
            lang, _, text = line.rstrip("\n").partition("\t")
            if lang in wanted:
                lines.append(text)
    return lines[::10]


@lru_cache(maxsize=None)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any UTF-8 text round-trips) with EOS and PAD."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
    )


def make_tiny_config(family: str = "llama", num_layers: int = 2, vocab_size: int = 512, **overrides):
    from transformers import AutoConfig

    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    kwargs = {**_COMMON, **FAMILY_CONFIGS[family], "num_hidden_layers": num_layers, "vocab_size": vocab_size}
    kwargs.update(overrides)
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, bos_token_id=0, eos_token_id=0, pad_token_id=1, **kwargs)


def make_tiny_model(directory: str | Path, family: str = "llama", num_layers: int = 2, seed: int = 0,
                    shared_direction: float = 0.0, **overrides) -> Path:
    """Save a random tiny model of `family` plus tokenizer to `directory`; return the path.

    `shared_direction` > 0 adds one common vector to every token embedding, so hidden states
    share a direction as in trained models (their cosine similarities are then positive,
    which Eq. 10 needs); 0 keeps a plain random model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = make_tiny_tokenizer()
    config = make_tiny_config(family, num_layers=num_layers, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init of norms is ones; perturb them so a hook on the wrong tensor shows up in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        if shared_direction:
            embeddings = model.get_input_embeddings().weight
            embeddings.add_(shared_direction * torch.randn(embeddings.shape[1]))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
