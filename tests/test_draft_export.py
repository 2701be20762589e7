"""`turbolm draft export`: an EAGLE-2 draft in vLLM's / SGLang's EAGLE layout, checked against an
independent implementation of that layout (transformers' own LlamaDecoderLayer), which must also
catch a wrong export; Jakiro refused; --no-fc-bias trains a draft vLLM runs exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_ids
from turbolm.cli import main
from turbolm.core.errors import ParameterError
from turbolm.speculative.draft.export import RENAME, check_export, export_eagle
from turbolm.speculative.draft.model import DraftConfig, DraftModel, load_draft
from turbolm.speculative.draft.train import train

LAYOUT = {"fc.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
          "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight",
          "layers.0.post_attention_layernorm.weight", "layers.0.mlp.gate_proj.weight",
          "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"}


def random_draft(target, arch="eagle2", **kw) -> DraftModel:
    torch.manual_seed(1)
    draft = DraftModel(DraftConfig.for_target(target, arch=arch, **kw))
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.1)  # far from the identity init: every part of the layout matters
    return draft.eval()


@pytest.mark.parametrize("bias", [True, False])
def test_export_matches_the_reference_layout(tiny, tmp_path, bias):
    target, _ = tiny
    draft = random_draft(target, fc_bias=bias)
    out = export_eagle(draft, target, tmp_path / "eagle")
    weights = load_file(out / "model.safetensors")
    assert set(weights) == LAYOUT | ({"fc.bias"} if bias else set())
    assert weights["fc.weight"].shape == (target.config.hidden_size, 2 * target.config.hidden_size)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["architectures"] == ["LlamaForCausalLM"]
    assert config["bias"] is bias and config["vocab_size"] == target.config.vocab_size
    check = check_export(out, draft, target, random_ids(40))
    assert check["tokens"] == 39 and check["max_feature_diff"] < 1e-4 and check["top1_agreement"] == 1.0
    assert ("top1_agreement_without_fc_bias" in check) is bias


@pytest.mark.parametrize("damage", ["swap q and k", "rope", "norm"])
def test_the_reference_catches_a_wrong_export(tiny, tmp_path, damage):
    """The check is worth something only if a layout mistake shows up in it."""
    target, _ = tiny
    draft = random_draft(target)
    out = export_eagle(draft, target, tmp_path / "eagle")
    weights = load_file(out / "model.safetensors")
    if damage == "swap q and k":
        q, k = "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight"
        weights[q][: weights[k].shape[0]], weights[k] = weights[k].clone(), weights[q][: weights[k].shape[0]].clone()
    elif damage == "norm":
        weights["layers.0.post_attention_layernorm.weight"] = torch.ones_like(weights["layers.0.post_attention_layernorm.weight"])
    if damage == "rope":
        config = json.loads((out / "config.json").read_text())
        config["rope_theta"] = config["rope_theta"] / 100
        (out / "config.json").write_text(json.dumps(config))
    else:
        save_file(weights, str(out / "model.safetensors"))
    check = check_export(out, draft, target, random_ids(40))
    assert check["max_feature_diff"] > 1e-3


def test_refusals(tiny, tmp_path):
    target, _ = tiny
    with pytest.raises(ParameterError, match="draft is a Jakiro draft") as e:
        export_eagle(random_draft(target, arch="jakiro"), target, tmp_path / "j")
    assert e.value.params == ("draft",)
    draft = random_draft(target)
    out = export_eagle(draft, target, tmp_path / "e")
    with pytest.raises(ParameterError, match="is not empty"):
        export_eagle(draft, target, out)
    export_eagle(draft, target, out, overwrite=True, dtype=torch.bfloat16)
    assert load_file(out / "model.safetensors")["fc.weight"].dtype is torch.bfloat16
    assert set(RENAME) >= {k for k in draft.state_dict() if k != "draft_vocab"}


def test_cli_export(tiny_dir, tiny, tmp_path, capsys):
    target, _ = tiny
    random_draft(target).save(tmp_path / "draft")
    args = ["draft", "export", "--draft", str(tmp_path / "draft"), "--out", str(tmp_path / "out"), "--target", str(tiny_dir)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement 100.0%" in text and "vLLM drops it" in text and "--speculative-algorithm EAGLE" in text
    assert main(args) == 2  # a second export into the same directory is refused ...
    assert "--out" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0  # ... unless asked


def test_no_fc_bias_training(prepared, tmp_path, tiny_dir):
    from test_draft_train import config

    out = tmp_path / "nobias"
    train(config(prepared, out, tiny_dir, arch="eagle2", epochs=1, fc_bias=False), progress=False)
    draft = load_draft(out)
    assert draft.config.fc_bias is False and draft.fc.bias is None and "fc.bias" not in draft.state_dict()
    # continuing the biased draft without its bias, and a bias-free one with a (zero) bias
    biased = tmp_path / "biased"
    train(config(prepared, biased, tiny_dir, arch="eagle2", epochs=1), progress=False)
    train(config(prepared, tmp_path / "dropped", tiny_dir, arch="eagle2", epochs=1, init=str(biased), fc_bias=False,
                 lr=0.0), progress=False)
    train(config(prepared, tmp_path / "added", tiny_dir, arch="eagle2", epochs=1, init=str(out), lr=0.0), progress=False)
    assert torch.equal(load_draft(tmp_path / "added").fc.bias, torch.zeros_like(load_draft(biased).fc.bias))


def test_fc_bias_flag():
    from turbolm.cli import build_parser

    parse = build_parser().parse_args
    base = ["draft", "train", "--data", "d", "--out", "o"]
    assert parse(base).fc_bias is True and parse(base + ["--no-fc-bias"]).fc_bias is False
