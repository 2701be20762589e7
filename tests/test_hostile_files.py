"""Hostile files (issue 16, classes 1, 3, 5, 7 and 8): damaged or hand-edited model folders, drafts,
pruners and prepared features; a draft of the other kind; code and pickles in a model folder; a GGUF
conversion cache that is damaged, left half-written or cannot be written. Every case goes through
the command line (one child process for all, tests/hostile.py) and must end in one clean
``turbolm: error:`` line, or, for the cache, in the right answer."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import Case, assert_clean_error, run_cli_cases

from conftest import make_tokenizer
from turbolm import TurboLMError, load_target
from turbolm.core import models

# --- building hostile files ----------------------------------------------------------------------


def make_gguf(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              intermediate: int = 128) -> Path:
    """A tiny random Llama as a float32 GGUF file (~0.5 MB), with the tiny BPE tokenizer: the real
    GGUF -> safetensors conversion of it takes about a second."""
    import gguf

    tok = make_tokenizer()
    vocab = len(tok)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(0)  # all float32
    ids = tok.get_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(sorted(ids, key=ids.get))
    w.add_token_types([3 if i in tok.all_special_ids else 1 for i in range(vocab)])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    g = np.random.default_rng(seed)

    def tensor(name, *shape):
        w.add_tensor(name, (g.standard_normal(shape) * 0.2).astype(np.float32))

    kv = kv_heads * hidden // heads
    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (intermediate, hidden)),
                            ("ffn_up", (intermediate, hidden)), ("ffn_down", (hidden, intermediate))):
            tensor(f"blk.{i}.{name}.weight", *shape)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    tensor("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def scribble(path: Path, seed: int = 0) -> None:
    """Random bytes written into the middle of the file, its size unchanged."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def edit_json(path: Path, **changes) -> None:
    """Set (or, with the value ``...``, remove) top-level keys of a JSON file."""
    obj = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            obj.pop(key, None)
        else:
            obj[key] = value
    path.write_text(json.dumps(obj))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def variant(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst)
    return dst


# --- one child process for every command line -----------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tiny, tiny_dir, tmp_path_factory):
    """{case name: (Result, what the case checks)}: every command line below, run in one child process."""
    from safetensors.torch import load_file, save_file

    from turbolm.pruning.checkpoint import pruner_config, save_pruner
    from turbolm.pruning.router import LearnedRouter
    from turbolm.speculative.draft.data import prepare_features
    from turbolm.speculative.draft.model import DraftConfig, DraftModel

    root = tmp_path_factory.mktemp("hostile_files")
    model, _ = tiny
    cases: dict[str, tuple[Case, tuple]] = {}
    gen = ["generate", "--prompt", "hi", "--max-new-tokens", "3"]

    # class 1 and 7: model folders
    def model_case(name, damage, *fragments, stdin=b""):
        d = variant(tiny_dir, root / "models" / name, damage)
        cases[f"model: {name}"] = (Case([*gen, "--model", d], stdin=stdin), ("error", fragments))

    def pickle_only(d):
        torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()

    def lacks_a_tensor(d):
        state = load_file(str(d / "model.safetensors"))
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})

    marker = root / "remote-code-ran"

    def remote_code(d):
        edit_json(d / "config.json", model_type="mystery", auto_map={"AutoConfig": "configuration_mystery.Config"})
        (d / "configuration_mystery.py").write_text(f"open({str(marker)!r}, 'w').close()\n")

    model_case("truncated weights", lambda d: truncate(d / "model.safetensors"), "model.safetensors", "truncated")
    model_case("hidden_size null", lambda d: edit_json(d / "config.json", hidden_size=None), "config.json", "hidden_size")
    model_case("hidden_size negative", lambda d: edit_json(d / "config.json", hidden_size=-64), "config.json",
               "hidden_size", "-64")
    model_case("config not an object", lambda d: (d / "config.json").write_text("[]"), "config.json", "JSON object")
    model_case("tokenizer damaged", lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer")
    model_case("a tensor missing", lacks_a_tensor, "lack", "model.layers.1.mlp.up_proj.weight")
    model_case("pickle weights only", pickle_only, "pytorch_model.bin", "pickle", "safetensors")
    model_case("remote code, answered yes", remote_code, "never runs code", stdin=b"y\ny\n")

    # class 1 and 5: draft checkpoints
    drafts = root / "drafts"
    for arch in ("jakiro", "eagle2"):
        torch.manual_seed(0)
        DraftModel(DraftConfig.for_target(model, arch=arch)).save(drafts / arch)
    m = ["--model", tiny_dir, "--tree", "fixed"]

    def draft_case(name, damage, *fragments, method="jakiro", arch="jakiro"):
        d = variant(drafts / arch, drafts / name, damage)
        cases[f"draft: {name}"] = (Case([*gen, *m, "--speculative", method, "--draft", d]), ("error", fragments))

    def wrong_shape(d):
        state = load_file(str(d / "model.safetensors"))
        state["fc.weight"] = state["fc.weight"][:, :10].contiguous()
        save_file(state, str(d / "model.safetensors"))

    def nan_weights(d):
        state = load_file(str(d / "model.safetensors"))
        state["o_proj.weight"][0, 0] = float("nan")
        save_file(state, str(d / "model.safetensors"))

    draft_case("truncated weights", lambda d: truncate(d / "model.safetensors"), "model.safetensors", "truncated")
    draft_case("hidden_size null", lambda d: edit_json(d / "config.json", hidden_size=None), "config.json",
               "hidden_size")
    draft_case("num_experts negative", lambda d: edit_json(d / "config.json", num_experts=-2), "config.json",
               "num_experts")
    draft_case("target null", lambda d: edit_json(d / "config.json", target=None), "config.json", "target")
    draft_case("config not an object", lambda d: (d / "config.json").write_text("3"), "config.json", "JSON object")
    draft_case("a tensor of the wrong shape", wrong_shape, "model.safetensors", "fc.weight", "shape")
    draft_case("NaN weights", nan_weights, "model.safetensors", "NaN")
    draft_case("eagle2 draft as jakiro", lambda d: None, "eagle2", "--speculative eagle2", arch="eagle2")
    draft_case("jakiro draft as eagle2", lambda d: None, "jakiro", "--speculative jakiro", method="eagle2")

    # class 1: pruner checkpoints
    pruners = root / "pruners"
    torch.manual_seed(0)
    router = LearnedRouter()
    save_pruner(pruners / "ok", pruner_config(model, router, [0.2, 0.4], target_sparsity=0.3), router)

    def pruner_case(name, damage, *fragments):
        d = variant(pruners / "ok", pruners / name, damage)
        argv = ["prune", "generate", "--pruner", d, "--model", tiny_dir, "--prompt", "hi", "--max-new-tokens", "3"]
        cases[f"pruner: {name}"] = (Case(argv), ("error", fragments))

    pruner_case("truncated router", lambda d: truncate(d / "router.safetensors"), "router.safetensors", "truncated")
    pruner_case("router missing", lambda d: (d / "router.safetensors").unlink(), "router.safetensors", "missing")
    pruner_case("schedule missing", lambda d: edit_json(d / "config.json", schedule=...), "config.json", "schedule")
    pruner_case("schedule null", lambda d: edit_json(d / "config.json", schedule=None), "config.json", "schedule")
    pruner_case("schedule too short", lambda d: edit_json(d / "config.json", schedule=[0.3]), "config.json",
                "1 blocks", "2 layers")
    pruner_case("threshold text", lambda d: edit_json(d / "config.json", threshold="high"), "config.json", "threshold")
    pruner_case("router_inputs unknown", lambda d: edit_json(d / "config.json", router_inputs=["colour"]),
                "config.json", "router_inputs")
    pruner_case("config not JSON", lambda d: (d / "config.json").write_text("{"), "config.json")

    # class 1 and 8: prepared features
    feats = root / "features"
    feats.mkdir()
    rows = [{"instruction": f"Name colour {i}.", "input": "", "output": "red green blue " * (1 + i % 3)} for i in range(6)]
    (feats / "data.json").write_text(json.dumps(rows))
    prepare_features(tiny_dir, feats / "data.json", feats / "ok", max_length=64, shard_size=2, progress=False)

    def features_case(name, data, *fragments):
        argv = ["draft", "train", "--data", data, "--out", root / "train-out" / name, "--target", tiny_dir]
        cases[f"features: {name}"] = (Case(argv), ("error", fragments))

    def partial(d):
        edit_json(d / "meta.json", complete=False, rows_done=2)

    (feats / "empty").mkdir()
    features_case("a dataset file", feats / "data.json", "data.json", "is a file", "turbolm draft prepare --data")
    features_case("missing", feats / "nowhere", "nowhere", "not found", "turbolm draft prepare")
    features_case("an empty directory", feats / "empty", "empty", "turbolm draft prepare")
    features_case("a model directory", tiny_dir, "meta.json", "turbolm draft prepare")
    features_case("a partial preparation", variant(feats / "ok", feats / "partial", partial), "unfinished")
    (feats / "tokens.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")  # damaged header
    features_case("a damaged token file", feats / "tokens.safetensors", "tokens.safetensors", "cannot read token file")
    features_case("a truncated shard", variant(feats / "ok", feats / "trunc", lambda d: truncate(d / "shard-00001.safetensors")),
                  "shard-00001.safetensors", "truncated")
    features_case("a missing shard", variant(feats / "ok", feats / "lost", lambda d: (d / "shard-00002.safetensors").unlink()),
                  "shard-00002.safetensors", "missing")
    features_case("meta shards null", variant(feats / "ok", feats / "meta-null", lambda d: edit_json(d / "meta.json", shards=None)),
                  "meta.json", "shards")
    features_case("meta not JSON", variant(feats / "ok", feats / "meta-bad", lambda d: (d / "meta.json").write_text("{")),
                  "meta.json")

    def other_shard(d):  # whole, but not the shard meta.json lists (its samples are longer)
        shutil.copy(d / "shard-00002.safetensors", d / "shard-00000.safetensors")

    features_case("a shard that does not match meta", variant(feats / "ok", feats / "mixed", other_shard),
                  "shard-00000.safetensors", "meta.json")

    # class 3: the GGUF cache cannot be written / holds what a killed conversion left
    gguf = make_gguf(root / "tiny.gguf")
    blocker = root / "a-file"
    blocker.write_text("not a directory")
    cases["gguf: unwritable cache"] = (Case([*gen, "--model", gguf, "--json"], env={"TURBOLM_CACHE": str(blocker / "cache")}),
                                       ("ok", ()))
    cache = root / "cache"
    stale = cache / "models" / f".tiny-0123456789abcdef.tmp-{dead_pid()}-deadbeef"  # its process is gone
    live = cache / "models" / f".other.tmp-{os.getpid()}-cafef00d"  # this process: alive, being written
    for d in (stale, live):
        (d / "model").mkdir(parents=True)
        (d / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    cases["gguf: stale temporaries"] = (Case([*gen, "--model", gguf, "--json"], env={"TURBOLM_CACHE": str(cache)}),
                                        ("ok", ()))

    damaged = root / "damaged.gguf"
    shutil.copy(gguf, damaged)
    truncate(damaged)
    cases["gguf: truncated file"] = (Case([*gen, "--model", damaged], env={"TURBOLM_CACHE": str(root / "cache2")}),
                                     ("error", ("damaged.gguf", "truncated")))
    for case, _ in cases.values():
        case.argv = [str(a) for a in case.argv]
    out = run_cli_cases([case for case, _ in cases.values()], root)
    results = {name: (r, cases[name][1]) for name, r in zip(cases, out)}
    results["_paths"] = {"marker": marker, "stale": stale, "live": live, "cache": cache, "blocker": blocker, "root": root}
    return results


ERROR_CASES = [
    "model: truncated weights", "model: hidden_size null", "model: hidden_size negative", "model: config not an object",
    "model: tokenizer damaged", "model: a tensor missing", "model: pickle weights only", "model: remote code, answered yes",
    "draft: truncated weights", "draft: hidden_size null", "draft: num_experts negative", "draft: target null",
    "draft: config not an object", "draft: a tensor of the wrong shape", "draft: NaN weights",
    "draft: eagle2 draft as jakiro", "draft: jakiro draft as eagle2",
    "pruner: truncated router", "pruner: router missing", "pruner: schedule missing", "pruner: schedule null",
    "pruner: schedule too short", "pruner: threshold text", "pruner: router_inputs unknown", "pruner: config not JSON",
    "features: a dataset file", "features: missing", "features: an empty directory", "features: a model directory",
    "features: a partial preparation", "features: a damaged token file", "features: a truncated shard", "features: a missing shard",
    "features: meta shards null", "features: meta not JSON", "features: a shard that does not match meta",
]


@pytest.mark.parametrize("name", ERROR_CASES)
def test_one_clean_line(hostile, name):
    result, (kind, fragments) = hostile[name]
    assert kind == "error"
    assert_clean_error(result, *fragments)


def test_code_in_a_model_folder_never_runs(hostile):
    """transformers asks on a terminal whether to run a folder's code; "y" on standard input must not run it."""
    assert not hostile["_paths"]["marker"].exists()


def test_every_transformers_load_refuses_remote_code():
    """Each from_pretrained in turbolm passes trust_remote_code=False (transformers' default asks on a terminal)."""
    root = Path(__file__).resolve().parent.parent / "turbolm"
    calls = [(p, m.start()) for p in root.rglob("*.py")
             for m in re.finditer(r"\.from_pretrained\(", p.read_text())]
    assert calls
    for path, start in calls:
        text = path.read_text()
        depth, first = 0, start + len(".from_pretrained")
        for end in range(first, len(text)):  # to the closing parenthesis
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        assert "trust_remote_code=False" in text[start:end], f"{path}: {text[start:end + 1]}"


def test_a_damaged_gguf_is_a_clean_error(hostile):
    """Conversion prints its progress first; then the one error line, and the cache holds nothing."""
    result, (_, fragments) = hostile["gguf: truncated file"]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("turbolm: error:") and all(f in last for f in fragments), result.stderr
    assert not [p for p in (hostile["_paths"]["root"] / "cache2" / "models").iterdir()]


def test_unwritable_cache_works_without_it(hostile):
    """A cache path that cannot be created: a warning per cache used (the converted model, the kernel
    table), each naming TURBOLM_CACHE, the answer, and nothing written."""
    result, _ = hostile["gguf: unwritable cache"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("turbolm: warning:")]
    assert warnings and all("TURBOLM_CACHE" in w and "this run only" in w for w in warnings), result.stderr
    assert "model cache" in warnings[0] and len(warnings) == len(set(warnings)) <= 2, result.stderr
    assert json.loads(result.stdout)["new_tokens"] == 3
    assert hostile["_paths"]["blocker"].read_text() == "not a directory"


def test_killed_conversions_are_cleaned_up_by_the_next_one(hostile):
    result, _ = hostile["gguf: stale temporaries"]
    assert result.returncode == 0, result.stderr
    paths = hostile["_paths"]
    assert not paths["stale"].exists()  # its process is gone
    assert paths["live"].exists()  # its process may still be converting
    assert [p.name for p in (paths["cache"] / "models").iterdir() if not p.name.startswith(".")]


# --- the GGUF cache in process (the real conversion of a tiny GGUF) -----------------------------


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOLM_CACHE", str(tmp_path / "cache"))
    return make_gguf(tmp_path / "tiny.gguf")


def _greedy(model, n: int = 8) -> list[int]:
    ids = torch.tensor([[5, 17, 42, 99]])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)[0].tolist()


def test_a_scribbled_cache_is_converted_again(tiny_gguf, monkeypatch):
    """Random bytes in the middle of the cached weights (size unchanged): the checksum catches them
    and the cache is converted again, so the answer stays the model's."""
    first = _greedy(load_target(tiny_gguf)[0])
    cached = models.gguf_cache_dir(tiny_gguf) / "model.safetensors"
    scribble(cached)
    conversions = []
    convert = models._convert_gguf
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: (conversions.append(a), convert(*a)))
    assert _greedy(load_target(tiny_gguf)[0]) == first
    assert len(conversions) == 1
    load_target(tiny_gguf)  # verified once: not converted again
    assert len(conversions) == 1


def test_verification_is_remembered_until_a_file_changes(tiny_gguf, monkeypatch):
    load_target(tiny_gguf)
    directory = models.gguf_cache_dir(tiny_gguf)
    hashed = []
    sha = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda p: (hashed.append(Path(p).name), sha(p))[1])
    assert models._cache_problem(directory) is None and hashed == []
    os.utime(directory / "config.json", ns=(1, 1))  # touched: hashed again (and still whole)
    assert models._cache_problem(directory) is None and hashed == ["config.json"]
    assert models._cache_problem(directory) is None and hashed == ["config.json"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_cache_is_used_but_not_written(tiny_gguf, caplog):
    model_dir = models.converted_gguf(tiny_gguf)
    first = _greedy(load_target(tiny_gguf)[0])
    shutil.rmtree(model_dir)
    cache = models.cache_root()
    for d in (cache, cache / "models"):
        d.chmod(0o555)
    try:
        assert _greedy(load_target(tiny_gguf)[0]) == first
    finally:
        for d in (cache, cache / "models"):
            d.chmod(0o755)
    assert any("turbolm: warning:" in r.getMessage() for r in caplog.records)


def test_a_conversion_that_fails_leaves_nothing(tiny_gguf, monkeypatch):
    def fails(gguf, out):
        Path(out).mkdir()
        (Path(out) / "model.safetensors").write_bytes(b"\0" * 1024)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "_convert_gguf", fails)
    with pytest.raises(TurboLMError, match="No space left on device.*TURBOLM_CACHE"):
        load_target(tiny_gguf)
    assert not list((models.cache_root() / "models").iterdir())
