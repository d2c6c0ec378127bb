"""`ropebert export`: the exported directory works with plain transformers / sentence-transformers in a fresh
process that cannot import ropebert, and gives the in-memory model's embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ropebert.model import RopeBertModel, from_bert
from ropebert.model.export import check_exported_source, export_model
from ropebert.model.load import load_source
from ropebert.model.verify import run_fresh_reload

SHORT = "query: how do rotary position embeddings extend the context of a text encoder?"

def run_fresh(export_dir: Path, texts: list[str]) -> dict:
    """The shared fresh-process probe (ropebert.model.reload_check, ropebert blocked): AutoModel and
    SentenceTransformer embeddings, and the attn_implementation mapping."""
    return run_fresh_reload(export_dir, {"texts": texts, "sentence_transformers": True,
                                         "attn_implementations": ["eager", "sdpa"]})


@pytest.fixture(scope="module")
def exported(minilm_dir, tmp_path_factory):
    model = from_bert(str(minilm_dir)).eval()
    out = tmp_path_factory.mktemp("export") / "minilm-rope"
    export_model(model, out)
    return model, out


def test_export_directory_layout(exported):
    model, out = exported
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_ropebert.RopeBertConfig",
        "AutoModel": "modeling_ropebert.RopeBertModel",
    }
    assert cfg["model_type"] == "ropebert"
    # transformers 5's rotary convention: rope_parameters (rope_type, rope_theta), no deprecated rope_scaling
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert "rope_scaling" not in cfg and "rope_theta" not in cfg
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "BertTokenizer" and "auto_map" not in tok_cfg
    # every long-context key is written (so editing config.json is all a user does), with its default
    long_context = {
        "position_mode": "default", "position_scale": 1.0,
        "original_max_position_embeddings": None, "self_extend": None, "attn_scale_base": 512,
        "rope_impl": "auto", "attn_backend": "auto", "max_position_embeddings": 512,
    }
    assert {k: cfg.get(k, "MISSING") for k in long_context} == long_context
    assert (out / "model.safetensors").is_file()
    pickles = [p.name for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    assert not pickles, pickles
    for p in out.rglob("*"):  # no pickle hidden under another name either (pickle protocol 2+ starts with 0x80)
        if p.is_file():
            assert not p.read_bytes()[:1] == b"\x80", p
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert "encoder.layer.0.attention.self.query.weight" in keys and "embeddings.word_embeddings.weight" in keys
    for name in ("tokenizer.json", "tokenizer_config.json", "modules.json", "1_Pooling/config.json",
                 "config_sentence_transformers.json", "sentence_bert_config.json"):
        assert (out / name).is_file(), name
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
        "sentence_transformers.models.Normalize",
    ]
    assert (out / modules[2]["path"]).is_dir()
    st_cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_cfg["prompts"] == {"query": "query: ", "passage": "passage: "}
    pooling = json.loads((out / "1_Pooling/config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    # the modeling code is the package's own file, byte for byte, and self-contained
    src = Path(__import__("ropebert.model", fromlist=["x"]).__file__).parent
    for name in ("modeling_ropebert.py", "configuration_ropebert.py"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
        check_exported_source(out / name)
    # rotary tables are never stored: the model has no buffers at all (transformers 5 leaves non-persistent
    # buffers uninitialised after from_pretrained); cos/sin are computed from rope_theta in every forward
    assert list(model.named_buffers()) == []


def test_fresh_process_matches_in_memory_model(exported, tmp_path):
    model, out = exported
    long_text = "passage: " + " ".join(
        f"Paragraph {i}: rotary embeddings encode relative position through rotations of query and key pairs."
        for i in range(120)
    )
    texts = [SHORT, long_text]
    res = run_fresh(out, texts)
    assert res["ropebert_imported"] is False and res["gpu_pkg_imported"] is False
    assert res["n_tokens"][0] < 40 and 1800 <= res["n_tokens"][1] <= 2600, res["n_tokens"]
    ref = model.encode(texts, max_length=4096)
    for key in ("hf", "st"):
        got = torch.tensor(res[key])
        assert (got - ref).abs().max().item() <= 1e-5, key
    assert res["default_backend"] == "auto"
    for impl in ("eager", "sdpa"):
        assert res["attn"][impl]["backend"] == impl
        assert (torch.tensor(res["attn"][impl]["emb"]) - ref[0]).abs().max().item() <= 1e-5, impl


def test_check_exported_source_rejects_ropebert_import(tmp_path):
    bad = tmp_path / "modeling_x.py"
    bad.write_text("import torch\ndef f():\n    from ropebert.kernels import rope\n")
    with pytest.raises(RuntimeError, match=r"modeling_x.py:3: .* must not import 'ropebert.kernels'"):
        check_exported_source(bad)


def test_export_cli_roundtrip_and_errors(minilm_dir, tmp_path):
    from ropebert.cli import main

    out = tmp_path / "out"
    assert main(["export", str(minilm_dir), "--out", str(out), "--rope-theta", "20000"]) == 0
    m = load_source(str(out))
    assert isinstance(m, RopeBertModel) and m.config.rope_theta == 20000.0
    assert main(["export", str(minilm_dir), "--out", str(out)]) == 1  # not empty, no --overwrite
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 1
    assert main(["nosuchcommand"]) == 2


def test_load_source_refuses_weights_under_an_unknown_prefix(tmp_path):
    """A checkpoint whose weights transformers cannot match must be an error, not a randomly initialised model."""
    from safetensors.torch import load_file, save_file

    from ropebert.model import RopeBertModel
    from ropebert.model.load import load_source
    from tests.conftest import tiny_config

    RopeBertModel(tiny_config()).save_pretrained(str(tmp_path))
    load_source(str(tmp_path))  # BERT names: loads
    st = load_file(str(tmp_path / "model.safetensors"))
    save_file({"bert." + k: v for k, v in st.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="weights missing from the checkpoint"):
        load_source(str(tmp_path))


def test_tokenizer_loads_in_a_fresh_process_the_way_users_call_it(exported):
    """`AutoTokenizer.from_pretrained(DIR)` with no trust_remote_code and stdin closed, ropebert blocked: the
    tokenizer's own class and ids, no rope deprecation warning (config.json uses rope_parameters).

    The custom-code prompt and the "model of type `ropebert`" log: transformers 4.x takes the tokenizer class from
    tokenizer_config.json without reading config.json, so neither appears. transformers 5 always resolves the model
    config first (AutoConfig, whose auto_map needs the custom code) before reading tokenizer_config.json, so the
    prompt (answered by the closed stdin) and the log come from transformers there, whatever the directory holds."""
    import transformers
    from transformers import AutoTokenizer

    model, out = exported
    res = run_fresh_reload(out, {"tokenizer_only": True, "texts": [SHORT]})
    tok = res["tokenizer"]
    assert res["ropebert_imported"] is False and tok["error"] is None, tok
    assert tok["class"] == "BertTokenizer"
    assert tok["input_ids"] == [AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)(SHORT)["input_ids"]]
    assert not [w for w in tok["warnings"] if "rope" in w.lower()], tok["warnings"]
    if int(transformers.__version__.split(".")[0]) < 5:
        assert "custom code" not in tok["stdout"] and "model of type" not in tok["log"], tok
    else:
        assert "Traceback" not in tok["log"]  # loads after transformers' own prompt (see the docstring)



@pytest.mark.parametrize("kwargs", [{"tokenizer_type": "bert"}, {"trust_remote_code": True}],
                         ids=["tokenizer_type", "trust_remote_code"])
def test_tokenizer_loads_silently_with_the_documented_calls(minilm_dir, tmp_path, kwargs):
    """The calls README documents for transformers 5 (where a bare AutoTokenizer.from_pretrained(DIR) always resolves
    the model config, whose auto_map needs custom code, before it reads tokenizer_config.json): in a fresh process
    with stdin closed and ropebert blocked, `tokenizer_type="bert"` runs no custom code at all and
    `trust_remote_code=True` (the same argument the model needs) loads only the config class; neither prompts,
    logs "instantiate a model of type" or warns, and both give the source tokenizer's ids."""
    from transformers import AutoTokenizer

    from tests.conftest import export_tiny_model

    out = export_tiny_model(tmp_path / "tiny", minilm_dir)
    res = run_fresh_reload(out, {"tokenizer_only": True, "texts": [SHORT], "tokenizer_kwargs": kwargs})
    tok = res["tokenizer"]
    assert res["ropebert_imported"] is False and tok["error"] is None, tok
    assert tok["class"] == "BertTokenizer", tok
    assert tok["input_ids"] == [AutoTokenizer.from_pretrained(str(minilm_dir))(SHORT)["input_ids"]]
    assert "custom code" not in tok["stdout"] and "[y/N]" not in tok["stdout"], tok
    assert "instantiate a model of type" not in tok["log"], tok
    assert not tok["warnings"], tok["warnings"]
    assert tok["custom_code"] is ("trust_remote_code" in kwargs), tok

def test_config_reads_old_rope_keys_and_writes_rope_parameters(tmp_path):
    """Old config.json (top-level rope_theta / rope_scaling, as earlier exports and E5-RoPE write) still loads;
    saving writes transformers 5's rope_parameters (PI = "linear", dynamic NTK = "dynamic")."""
    from ropebert.model import RopeBertConfig
    from tests.conftest import tiny_config

    RopeBertModel(tiny_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for old, rp in [
        ({"rope_theta": 50000.0, "rope_scaling": {"type": "pi", "factor": 4.0}},
         {"rope_type": "linear", "rope_theta": 50000.0, "factor": 4.0}),
        ({"rope_theta": 20000.0, "rope_scaling": {"type": "dynamic_ntk", "factor": 2.0}},
         {"rope_type": "dynamic", "rope_theta": 20000.0, "factor": 2.0}),
        ({"rope_theta": 30000.0, "rope_scaling": None}, {"rope_type": "default", "rope_theta": 30000.0}),
        ({"rope_theta": 10000.0, "rope_scaling": {"type": "pi", "factor": "auto"}},
         {"rope_type": "linear", "rope_theta": 10000.0, "factor": "auto"}),
    ]:
        legacy = {k: v for k, v in cfg.items() if k != "rope_parameters"} | old
        (tmp_path / "config.json").write_text(json.dumps(legacy))
        m = load_source(str(tmp_path))
        assert m.config.rope_theta == old["rope_theta"] and m.config.rope_scaling == old["rope_scaling"]
        assert m.config.to_dict()["rope_parameters"] == rp and "rope_scaling" not in m.config.to_dict()
        new = RopeBertConfig.from_dict({k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
                                       | {"rope_parameters": rp})
        assert (new.rope_theta, new.rope_scaling) == (old["rope_theta"], old["rope_scaling"])
    with pytest.raises(ValueError, match="unknown type 'yarn'"):
        RopeBertConfig(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
