# Copyright ropebert contributors. Apache-2.0.
"""Fresh-process reload probe: load an exported directory with plain transformers / sentence-transformers while
ropebert cannot be imported, and report what it computes (and whether an optional GPU package was imported).

Run by ropebert.model.verify (never imported): `python -I reload_check.py DIR REQUEST.json OUT.json`.
REQUEST keys (all optional):
    texts                  list of strings -> "hf": masked-mean-pooled, L2-normalised AutoModel embeddings,
                           "n_tokens": their token counts (no truncation)
    sentence_transformers  true -> "st": SentenceTransformer(DIR).encode(texts) with max_seq_length st_max_length
    attn_implementations   ["eager", "sdpa"] -> "attn": {impl: {"backend", "emb"}} for texts[0]
    input_ids              [[...]] -> "hidden": last hidden state of the first row (all tokens real)
    bad_config_edits       [{key: value}, ...] -> "bad_config_errors": the ValueError text of loading a copy of
                           DIR whose config.json has the edit applied, or null when it loaded
    tokenizer_only         true -> only `AutoTokenizer.from_pretrained(DIR, **tokenizer_kwargs)` the way users call
                           it (default: no keyword, so no trust_remote_code; stdin is closed by the caller), nothing
                           else loaded: "tokenizer": {"class", "input_ids" (of texts), "stdout", "log", "warnings"
                           (what it printed, logged through transformers' logger and warned), "custom_code" (whether
                           the directory's own Python files were imported)}
    tokenizer_kwargs       keyword arguments for that AutoTokenizer call (e.g. {"tokenizer_type": "bert"})
Always reported: ropebert_imported, gpu_pkg_imported, theta, self_extend, default_backend (not for tokenizer_only).
"""

import contextlib
import importlib.abc
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings

sys.path.pop(0)  # the script's own directory (ropebert's model/ folder) must not be importable
BLOCKED = ("ropebert",)  # optional GPU packages are not blocked (transformers probes them) but reported


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in the fresh-process reload check")


def tokenizer_probe(model_dir: str, texts: list, kwargs: dict | None = None) -> dict:
    """AutoTokenizer.from_pretrained(DIR, **kwargs) (default: no trust_remote_code), recording its stdout (an
    interactive prompt would print there), transformers' log records and warnings, and whether the directory's
    custom code (transformers_modules.*) was imported."""
    from transformers import AutoTokenizer

    out, log = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(log)
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        try:
            tok = AutoTokenizer.from_pretrained(model_dir, **(kwargs or {}))
            error = None
        except Exception as e:  # reported, not raised: the caller asserts on it
            tok, error = None, f"{type(e).__name__}: {e}"
    tf_logger.removeHandler(handler)
    return {
        "class": None if tok is None else type(tok).__name__,
        "error": error,
        "input_ids": [] if tok is None else [tok(t)["input_ids"] for t in texts],
        "stdout": out.getvalue(),
        "log": log.getvalue(),
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                     if not issubclass(w.category, DeprecationWarning)],
        "custom_code": any(k.split(".")[0] == "transformers_modules" for k in sys.modules),
    }


def main(model_dir: str, request_file: str, out_file: str) -> None:
    sys.meta_path.insert(0, Block())
    req = json.load(open(request_file, encoding="utf-8"))
    if req.get("tokenizer_only"):
        res = {"tokenizer": tokenizer_probe(model_dir, req.get("texts") or [], req.get("tokenizer_kwargs"))}
        res["ropebert_imported"] = any(k.split(".")[0] == "ropebert" for k in sys.modules)
        import transformers

        res["transformers_version"] = transformers.__version__
        with open(out_file, "w", encoding="utf-8") as f:
            json.dump(res, f)
        return
    warnings.filterwarnings("ignore")
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = req.get("texts") or []
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    res = {"hf": [], "n_tokens": []}
    dim = getattr(model.config, "embedding_dim", None) or model.config.hidden_size  # a Matryoshka export's size
    if texts or req.get("attn_implementations"):
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    for t in texts:
        b = tok([t], return_tensors="pt", truncation=False)
        res["n_tokens"].append(int(b["input_ids"].shape[1]))
        with torch.no_grad():
            h = model(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        res["hf"].append(torch.nn.functional.normalize(((h * m).sum(1) / m.sum(1))[:, :dim], dim=-1)[0].tolist())
    if req.get("sentence_transformers"):
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model_dir, trust_remote_code=True, device="cpu")
        st.max_seq_length = int(req.get("st_max_length", 4096))
        # truncate_dim (a Matryoshka export) cuts after the Normalize module: renormalise, as its docs advise
        res["st"] = st.encode(texts, convert_to_numpy=True, batch_size=1, normalize_embeddings=True).tolist()
        res["st_dim"] = st.get_sentence_embedding_dimension()
    res["attn"] = {}
    for impl in req.get("attn_implementations") or []:
        m = AutoModel.from_pretrained(model_dir, trust_remote_code=True, attn_implementation=impl).eval()
        b = tok([texts[0]], return_tensors="pt")
        with torch.no_grad():
            h = m(**b).last_hidden_state
        res["attn"][impl] = {"backend": m.config.attn_backend,
                             "emb": torch.nn.functional.normalize(h.mean(1), dim=-1)[0].tolist()}
    if req.get("input_ids") is not None:
        ids = torch.tensor(req["input_ids"])
        with torch.no_grad():
            res["hidden"] = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].tolist()
    errors = []
    for edit in req.get("bad_config_edits") or []:
        bad = tempfile.mkdtemp()
        for f in os.listdir(model_dir):
            if f.endswith((".json", ".py", ".safetensors")):
                shutil.copy(os.path.join(model_dir, f), bad)
        cfg = json.load(open(os.path.join(bad, "config.json")))
        cfg.update(edit)
        json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
        try:
            AutoModel.from_pretrained(bad, trust_remote_code=True)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
        shutil.rmtree(bad, ignore_errors=True)
    res["bad_config_errors"] = errors
    res["ropebert_imported"] = any(k.split(".")[0] == "ropebert" for k in sys.modules)
    res["gpu_pkg_imported"] = any(k.split(".")[0] in ("flash_attn", "xformers") for k in sys.modules)
    res["theta"] = model.config.rope_theta
    res["self_extend"] = getattr(model.config, "self_extend", None)
    res["default_backend"] = getattr(model.config, "attn_backend", None)
    with open(out_file, "w", encoding="utf-8") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
