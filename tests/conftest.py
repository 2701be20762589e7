"""Shared fixtures: tiny random models (Llama, Qwen2, Mistral) with a tiny BPE tokenizer, saved as
ordinary Hugging Face model directories, and the real default model for `slow` tests."""

from __future__ import annotations

import json

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Write a short poem about the sea and the sky and the stars.",
    "def add(a, b):\n    return a + b\n",
    "Speculative decoding drafts tokens and the target verifies them in one forward pass.",
    "Hello world! Numbers: 0 1 2 3 4 5 6 7 8 9, and punctuation: ;:?!.,'\"()[]{}",
] * 4


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_config(arch: str, tokenizer, **overrides):
    import transformers

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch.startswith("gemma"):  # alternating sliding-window / full layers, soft-capping
        common.update(num_hidden_layers=4, head_dim=16, sliding_window=24)
    common.update(overrides)
    cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
    }[arch]
    return cls(**common)


def make_model_dir(path, arch: str = "llama", seed: int = 0, **overrides):
    """Save a tiny random causal LM with its tokenizer to ``path``; return the path."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, tokenizer, **overrides))
    # Larger weights than the default init give peaked, varied next-token distributions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


ARCHS = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{arch: directory} of tiny random models, built once per test session."""
    return {arch: make_model_dir(tmp_path_factory.mktemp(arch), arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from turbolm import load_target

    return load_target(tiny_dir)


def random_ids(T: int = 24, B: int = 1, seed: int = 0) -> torch.Tensor:
    """Token ids (B, T) from the tiny tokenizer's ordinary range, reproducible."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (B, T), generator=g)


@pytest.fixture(scope="session")
def three_layer_llama(tmp_path_factory):
    """(model, tokenizer): a tiny random Llama with three layers (the pruning tests' workhorse)."""
    from turbolm import load_target

    return load_target(make_model_dir(tmp_path_factory.mktemp("three"), "llama", num_hidden_layers=3, seed=1))


@pytest.fixture(scope="session")
def default_model():
    from turbolm import load_target

    return load_target()


@pytest.fixture(scope="session")
def near_bigram(tmp_path_factory):
    """(target, tokenizer, draft): a tiny random Llama whose layers barely touch the residual stream
    (its next token mostly follows from the last one, so its greedy answers fall into loops), and a
    Jakiro draft that predicts exactly that part (its input token's embedding through the target's
    lm_head) with a little noise. Its autoregressive levels agree with the target often, its
    contrastive output (about the same feature: the next token of the grandparent) rarely."""
    from turbolm import load_target
    from turbolm.speculative.draft.model import DraftConfig, DraftModel

    target, tok = load_target(make_model_dir(tmp_path_factory.mktemp("bigram"), "llama"))
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.02)
            layer.mlp.down_proj.weight.mul_(0.02)
    torch.manual_seed(0)
    draft = DraftModel(DraftConfig.for_target(target)).eval()
    H = target.config.hidden_size
    with torch.no_grad():
        draft.fc.weight.zero_()
        draft.fc.weight[:, :H] = torch.eye(H)  # the input token's embedding; the feature is ignored
        draft.fc.bias.zero_()
        draft.o_proj.weight.zero_()
        for expert in draft.experts:
            expert.down_proj.weight.normal_(0, 0.02)
    return target, tok, draft


DRAFT_ROWS = [
    {"instruction": f"Say the colours number {i}.", "input": "", "output": "red green blue " * (2 + i % 3) + "and the sea."}
    for i in range(36)
]


@pytest.fixture(scope="session")
def prepared(tiny_dir, tmp_path_factory):
    """Target features of 36 tiny chat rows for draft training (``turbolm draft prepare``'s output)."""
    from turbolm.speculative.draft.data import prepare_features

    d = tmp_path_factory.mktemp("prep")
    (d / "data.json").write_text(json.dumps(DRAFT_ROWS))
    prepare_features(tiny_dir, d / "data.json", d / "features", max_length=128, shard_size=16, progress=False)
    return d / "features"
