"""Tiny random models of every supported family, built offline, for tests and benchmarks; and, for
the vocabulary tests, the builtin corpus by language and tokenizers in the styles no offline model
offers (Llama 2: SentencePiece-style BPE with byte fallback; Llama 3: byte-level BPE with a Split
regex, ignore_merges and specials after the vocab) beside SmolLM2's own (from the demo GGUF).

Nothing here touches the network: the tokenizers are trained on the embedded corpus in well
under a second, and the weights are random.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from layermoe.data import builtin_corpus_path
from layermoe.data.split import is_heldout
from layermoe.modeling.base import demo_model_path

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


# ---------------------------------------------------------------- vocabulary tests
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@lru_cache(maxsize=1)
def corpus() -> dict[str, list[str]]:
    """language code -> its 1000 sentences, in file order."""
    texts: dict[str, list[str]] = {}
    with open(builtin_corpus_path(), encoding="utf-8") as handle:
        for line in handle:
            lang, _, text = line.rstrip("\n").partition("\t")
            if text:
                texts.setdefault(lang, []).append(text)
    return texts


@lru_cache(maxsize=None)
def _split(lang: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    texts = corpus()[lang]
    return tuple(t for t in texts if not is_heldout(t)), tuple(t for t in texts if is_heldout(t))


def split(lang: str) -> tuple[list[str], list[str]]:
    """(train, held-out) sentences of one language by layermoe's hash rule."""
    train, heldout = _split(lang)
    return list(train), list(heldout)


def smollm2_json(cache_dir: Path) -> dict:
    """SmolLM2-135M-Instruct's tokenizer.json, converted from the GGUF once (about 20 s) into cache_dir."""
    path = Path(cache_dir) / "tokenizer.json"
    if not path.is_file():
        from transformers import AutoTokenizer

        gguf = demo_model_path()
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(cache_dir))
    return json.loads(path.read_text(encoding="utf-8"))


def _sentences(langs: tuple[str, ...]) -> list[str]:
    return [t for lang in langs for t in split(lang)[0]]


def llama2_style_json(langs: tuple[str, ...] = ("en", "es"), vocab_size: int = 3000, limit_alphabet: int = 120,
                      metaspace: bool = False) -> dict:
    """A Llama-2-like tokenizer.json: <unk> <s> </s>, 256 <0xXX> byte tokens, BPE with byte_fallback,
    spaces as ▁ (normalizer Prepend+Replace, no pre-tokenizer; or, with metaspace=True, the newer
    Metaspace(prepend_scheme=first, split=False) form), digits never merged."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  limit_alphabet=limit_alphabet, show_progress=False)
    tok.train_from_iterator(_sentences(langs), trainer)
    trained = json.loads(tok.to_str())
    old_vocab = sorted(trained["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for token, _ in old_vocab:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in trained["model"]["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                                         decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return json.loads(tok.to_str())


def llama3_style_json(langs: tuple[str, ...] = ("en", "es"), vocab_size: int = 3000) -> dict:
    """A Llama-3-like tokenizer.json: Split(regex) + ByteLevel, BPE with ignore_merges, and the
    special tokens as added tokens after the whole model vocab."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_sentences(langs), trainer)
    n = tok.get_vocab_size()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(6)]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", n)])
    result = json.loads(tok.to_str())
    assert min(t["id"] for t in result["added_tokens"]) == n  # the specials sit after the vocab
    return result
