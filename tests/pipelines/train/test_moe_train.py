"""MoE load-balancing loss in training: GradCache step == uncached step (loss, every gradient, aux included),
the replay routes as pass 1 did, and the step's term is the model's Switch loss."""

from __future__ import annotations

import pytest
import torch

from ropebert.model import RopeBertModel
from ropebert.pipelines.train.gradcache import contrastive_step
from ropebert.pipelines.train.moe import MoEAux
from tests.conftest import padded_batch, tiny_config
from tests.pipelines.train.test_gradcache import _groups, _loss_fn

MOE = {"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.3}


def _moe_model(dropout=0.0):
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=4, moe=MOE, hidden_dropout_prob=dropout)
    return RopeBertModel(cfg).train()


def _step(model, chunk, seed=0):
    aux = MoEAux(model)
    torch.manual_seed(seed)
    res = contrastive_step(aux.wrap_embed(model.embed, cached=chunk is not None), _groups(), aux.wrap_loss(_loss_fn),
                           chunk_size=chunk)
    aux.check_replay()
    return res, aux, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_gradcache_step_equals_uncached_step_with_the_aux_loss():
    r0, a0, g0 = _step(_moe_model(), None)
    r1, a1, g1 = _step(_moe_model(), 2)
    s0, s1 = a0.summary(), a1.summary()
    assert set(s0) == set(s1) and "train/moe/layer3/entropy" in s0
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-5, atol=1e-6, msg=k)
    moe_aux = s0["train/moe_aux"]
    assert 0.3 <= moe_aux.item() <= 0.3 * 4  # coef * [1 (balanced), E (collapsed)]
    torch.testing.assert_close(r0.stats["moe_aux"], moe_aux, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r1.stats["aux"], moe_aux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r1.loss, r0.loss, rtol=1e-6, atol=1e-6)
    assert set(g0) == set(g1) and len(g0) == len(list(_moe_model().parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
    # the aux term backpropagates through the router: without it the router gradient differs
    plain = _moe_model()
    torch.manual_seed(0)
    contrastive_step(plain.embed, _groups(), _loss_fn, chunk_size=None)
    w = "encoder.layer.1.moe.router.weight"
    assert (plain.get_parameter(w).grad - g0[w]).abs().max() > 1e-6


def test_replay_routes_exactly_as_pass_one_with_dropout():
    _, aux, _ = _step(_moe_model(dropout=0.1), 2)
    assert aux.replay_counts.sum() > 0 and torch.equal(aux.replay_counts, aux.counts)
    n_tokens = sum(int(g["attention_mask"].sum()) for g in _groups().values())
    assert aux.tokens == n_tokens and torch.all(aux.counts.sum(-1) == 2 * n_tokens)


def test_step_term_of_one_forward_is_the_models_aux_loss():
    model = _moe_model()
    ids, mask = padded_batch([5, 9, 12, 4])
    aux = MoEAux(model)
    emb = aux.wrap_embed(model.embed, cached=False)(ids, mask)
    loss, stats = aux.wrap_loss(lambda e: (e["x"].sum() * 0, {}))({"x": emb})
    ref = model.embed(ids, mask, output_moe=True)[1]
    torch.testing.assert_close(stats["moe_aux"], ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_dense_model_is_untouched():
    torch.manual_seed(0)
    m = RopeBertModel(tiny_config()).train()
    aux = MoEAux(m)
    assert not aux.active and aux.wrap_embed(m.embed, cached=True) == m.embed and aux.summary() == {}


@pytest.mark.parametrize("chunk", [None, 2])
def test_activation_checkpointing_recompute_is_not_counted_twice(chunk):
    model = _moe_model()
    model.gradient_checkpointing_enable()
    _, aux, _ = _step(model, chunk)
    n_tokens = sum(int(g["attention_mask"].sum()) for g in _groups().values())
    assert aux.tokens == n_tokens


def test_fit_an_upcycled_model_logs_the_moe_terms_and_checkpoints_it(tiny_bert_dir, pair_shards, tmp_path):
    from ropebert.model.export import export_model
    from ropebert.model.load import load_source
    from ropebert.model.upcycle import upcycle
    from ropebert.pipelines.train.fit import cli_main
    from tests.pipelines.train.test_train import _base_args

    src = load_source(str(tiny_bert_dir))
    init = export_model(upcycle(src, num_experts=4, top_k=2, every_n_layers=2), tmp_path / "moe-init")
    cli = cli_main(_base_args(init, pair_shards, tiny_bert_dir, tmp_path / "run", steps=3))
    assert cli.trainer.global_step == 3
    m = cli.trainer.callback_metrics
    layers = cli.model.model.config.moe_layers
    assert layers and 1.0 <= float(m["train/moe_aux"]) <= 4.0
    for i in layers:
        assert 0.0 <= float(m[f"train/moe/layer{i}/min_share"]) <= 0.25 <= float(m[f"train/moe/layer{i}/max_share"])
        assert 0.0 < float(m[f"train/moe/layer{i}/entropy"]) <= float(torch.log(torch.tensor(4.0))) + 1e-6
    before = load_source(str(init)).encoder.layer[layers[0]].moe.router.weight
    after = load_source(str(tmp_path / "run" / "ckpt" / "last.ckpt")).encoder.layer[layers[0]].moe.router.weight
    assert (after - before).abs().max() > 1e-5


# -- model.moe: upcycle a dense init when the module is built, or check an MoE init's block --------------------


def test_model_moe_through_the_cli_upcycles_a_dense_init(tiny_bert_dir, pair_shards):
    from ropebert.model.upcycle import upcycle
    from ropebert.pipelines.train.fit import cli_main
    from ropebert.pipelines.train.module import load_init_model

    cli = cli_main(["--model.init_from", str(tiny_bert_dir), "--model.moe.num_experts", "4", "--model.moe.top_k", "2",
                    "--model.moe.aux_loss_coef", "0.5", "--model.seed", "3", "--data.train_dir", str(pair_shards),
                    "--trainer.logger", "false"], run=False)
    module = cli.model
    want = {"num_experts": 4, "top_k": 2, "every_n_layers": 2, "normalize_weights": False, "aux_loss_coef": 0.5}
    assert module.hparams.moe == want and module.model.config.moe == want and module.model.config.moe_layers == [1]
    assert module.model.training and module._moe.active and module._moe.coef == 0.5
    dense = load_init_model(str(tiny_bert_dir))
    moe = module.model.encoder.layer[1].moe.experts
    d1 = dense.encoder.layer[1]
    for e in range(4):
        assert torch.equal(moe.intermediate_weight[e], d1.intermediate.dense.weight)
        assert torch.equal(moe.intermediate_bias[e], d1.intermediate.dense.bias)
        assert torch.equal(moe.output_weight[e], d1.output.dense.weight)
        assert torch.equal(moe.output_bias[e], d1.output.dense.bias)
    assert torch.equal(module.model.encoder.layer[0].intermediate.dense.weight, dense.encoder.layer[0].intermediate.dense.weight)
    # the router is `ropebert upcycle --seed 3`'s
    ref = upcycle(dense, num_experts=4, top_k=2, aux_loss_coef=0.5, seed=3)
    router = module.model.encoder.layer[1].moe.router.weight
    assert torch.equal(router, ref.encoder.layer[1].moe.router.weight) and 0 < router.abs().max() < 1e-2
    names = {n for n, _ in module.named_parameters()}
    assert "model.encoder.layer.1.moe.router.weight" in names and "model.encoder.layer.1.intermediate.dense.weight" not in names


def test_model_moe_over_an_moe_init_must_match_its_block(tiny_bert_dir, tmp_path):
    from ropebert.errors import InputError
    from ropebert.model.export import export_model
    from ropebert.model.load import load_source
    from ropebert.model.upcycle import upcycle
    from ropebert.pipelines.train.module import RopeBertContrastive

    init = export_model(upcycle(load_source(str(tiny_bert_dir)), num_experts=4, top_k=2, seed=1), tmp_path / "moe")
    same = RopeBertContrastive(init_from=str(init), moe={"num_experts": 4, "top_k": 2})
    plain = RopeBertContrastive(init_from=str(init))
    for (n, a), (_, b) in zip(same.model.named_parameters(), plain.model.named_parameters()):
        assert torch.equal(a, b), n  # the init's experts and router, not a fresh upcycle
    with pytest.raises(InputError, match=r"model.moe \{'num_experts': 8.*'top_k': 2.*\(its config's moe: "
                                         r"\{'num_experts': 4"):
        RopeBertContrastive(init_from=str(init), moe={"num_experts": 8})


@pytest.mark.parametrize("moe, match", [
    ({"top_k": 9}, r"model.moe.top_k=9 exceeds model.moe.num_experts=8"),
    ({"num_experts": 0}, r"model.moe.num_experts must be an integer >= 1, got 0"),
    ({"every_n_layers": 0}, r"model.moe.every_n_layers must be an integer >= 1"),
    ({"experts": 4}, r"unknown keys \['experts'\]"),
    ({"aux_loss_coef": -1.0}, r"aux_loss_coef must be a finite number >= 0"),
    ("8", r"model.moe must be null or a mapping"),
])
def test_bad_model_moe_is_a_clear_error(moe, match):
    from ropebert.errors import InputError
    from ropebert.pipelines.train.moe import moe_settings

    with pytest.raises(InputError, match=match):
        moe_settings(moe)


def test_model_moe_that_puts_no_moe_layer_in_the_init_is_a_clear_error(tmp_path):
    from transformers import BertConfig, BertModel

    from ropebert.errors import InputError
    from ropebert.pipelines.train.module import RopeBertContrastive

    torch.manual_seed(0)  # one layer: layer 0 is never MoE with every_n_layers 2
    BertModel(BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(tmp_path / "one"))
    with pytest.raises(InputError, match=r"model.moe .* over model.init_from .*every_n_layers=2 puts no MoE layer in 1"):
        RopeBertContrastive(init_from=str(tmp_path / "one"), moe={"num_experts": 2})


def test_resume_with_another_moe_than_the_checkpoints_is_refused(tiny_bert_dir):
    from ropebert.errors import InputError
    from ropebert.model.load.checkpoint import CHECKPOINT_KEY, checkpoint_payload
    from ropebert.pipelines.train.module import RopeBertContrastive

    dense = RopeBertContrastive(init_from=str(tiny_bert_dir))
    ckpt = {CHECKPOINT_KEY: checkpoint_payload(dense.model, {})}
    dense.on_load_checkpoint(ckpt)  # the same model: accepted
    moe = RopeBertContrastive(init_from=str(tiny_bert_dir), moe={"num_experts": 2, "top_k": 1})
    with pytest.raises(InputError, match=r"resume: the checkpoint's model has moe=None, this run's moe=\{'num_experts': 2"):
        moe.on_load_checkpoint(ckpt)


# -- 2 gloo ranks == 1 process with MoE: loss, every parameter gradient, the per-rank aux ------------------------

DIST_SCENARIOS = [(0, None), (0, 3), (3, 2)]  # (hard negatives per query, GradCache chunk)


def _dist_groups(rows, K):
    from tests.pipelines.train.test_loss import _scenario_inputs

    q, p, n = _scenario_inputs(K)
    sel = lambda b, r: {"input_ids": b[0][r], "attention_mask": b[1][r]}  # noqa: E731
    groups = {"query": sel(q, rows), "passage": sel(p, rows)}
    if K:
        groups["negatives"] = sel(n, torch.cat([torch.arange(i * K, (i + 1) * K) for i in rows.tolist()]))
    return groups


def _dist_loss_fn(B, K, gather):
    from ropebert.pipelines.train.loss import contrastive_loss

    def fn(embs):
        neg = embs["negatives"].view(B, K, -1) if K else None
        return contrastive_loss(embs["query"], embs["passage"], neg, temperature=0.05, gather=gather,
                                return_stats=True)
    return fn


def _rank_step(model, rows, K, chunk):
    """One rank's training step (the module's composition): returns (loss, the rank's MoE term)."""
    groups = _dist_groups(rows, K)
    aux = MoEAux(model)
    cached = chunk is not None and any(g["input_ids"].shape[0] > chunk for g in groups.values())
    res = contrastive_step(aux.wrap_embed(model.embed, cached), groups,
                           aux.wrap_loss(_dist_loss_fn(len(rows), K, gather=True)), chunk_size=chunk)
    aux.check_replay()
    return res.loss.detach(), aux.summary()["train/moe_aux"]


def _moe_dist_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)  # forked: no OpenMP pool inherited from the parent (GNU OpenMP is not fork-safe)
    import os

    import torch.distributed as dist

    from ropebert.pipelines.train.gradcache import allreduce_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for K, chunk in DIST_SCENARIOS:
        model = _moe_model()
        loss, aux = _rank_step(model, torch.arange(rank * 4, (rank + 1) * 4), K, chunk)
        assert allreduce_gradients(model.parameters()) == 1
        both = torch.stack([loss, aux.to(loss.dtype)]).clone()
        dist.all_reduce(both)
        results.append({"loss": (both[0] / world).item(), "aux": (both[1] / world).item(), "own_aux": aux.item(),
                        "grads": {k: p.grad.clone() for k, p in model.named_parameters()}})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _one_process_reference(K):
    """What the 2-rank step computes, in one process: the whole batch's InfoNCE (8 queries against every passage)
    plus the mean of the MoE terms of the two row slices (each one's Switch loss over its own tokens)."""
    model = _moe_model()
    res = contrastive_step(model.embed, _dist_groups(torch.arange(8), K), _dist_loss_fn(8, K, gather=False),
                           chunk_size=None)  # backward inside
    aux = MoEAux(model)
    terms = []
    for r in range(2):
        aux.begin_step()
        embed = aux.wrap_embed(model.embed, cached=False)
        embs = {k: embed(g["input_ids"], g["attention_mask"]) for k, g in _dist_groups(torch.arange(4 * r, 4 * r + 4), K).items()}
        term, stats = aux.wrap_loss(lambda e: (sum(v.sum() for v in e.values()) * 0, {}))(embs)
        (term / 2).backward()
        terms.append(stats["moe_aux"])
    whole = MoEAux(model)  # the global batch's Switch loss, for contrast
    embed = whole.wrap_embed(model.embed, cached=False)
    for g in _dist_groups(torch.arange(8), K).values():
        embed(g["input_ids"], g["attention_mask"])  # (with grad: a graph-less call would be a GradCache pass 1)
    return model, res.loss.detach(), terms, whole.summary()["train/moe_aux"]


def test_two_gloo_ranks_equal_one_process_with_moe(tmp_path):
    import torch.multiprocessing as mp

    from tests.pipelines.train.test_loss import _free_port

    mp.start_processes(_moe_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for si, (K, chunk) in enumerate(DIST_SCENARIOS):
        model, infonce, terms, whole = _one_process_reference(K)
        aux_mean = (terms[0] + terms[1]) / 2
        assert 0.3 <= aux_mean.item() <= 0.3 * 4
        # the per-rank terms are each slice's own Switch loss, and their mean is not the global batch's
        for r in range(2):
            assert ranks[r][si]["own_aux"] == pytest.approx(terms[r].item(), rel=2e-6), (si, r)
        assert abs(aux_mean.item() - whole.item()) > 1e-5  # (the tolerance below is 2e-6 relative)
        for r in range(2):
            got = ranks[r][si]
            assert got["aux"] == pytest.approx(aux_mean.item(), rel=2e-6), (si, r)
            assert got["loss"] == pytest.approx((infonce + aux_mean).item(), rel=1e-5, abs=1e-6), (si, r)
            assert set(got["grads"]) == {n for n, _ in model.named_parameters()}
            for name, p in model.named_parameters():
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{si} {name}: {m}")


def test_demo_moe_config_is_the_dense_recipe_plus_model_moe(tiny_bert_dir, pair_shards):
    import yaml

    from ropebert.pipelines.train.fit import cli_main
    from tests.conftest import REPO

    dense = yaml.safe_load((REPO / "configs/demo/pretrain.yaml").read_text())
    moe = yaml.safe_load((REPO / "configs/demo/pretrain-moe.yaml").read_text())
    want = {"num_experts": 8, "top_k": 2, "every_n_layers": 2, "normalize_weights": False, "aux_loss_coef": 1.0}
    assert moe["model"].pop("moe") == want
    assert moe["model"].pop("step_log") == "artifacts/logs/demo-pretrain-moe-steps"
    dense["model"].pop("step_log")
    assert moe["model"] == dense["model"] and moe["data"] == dense["data"]
    assert moe["checkpoint"] == {**dense["checkpoint"], "dirpath": "artifacts/ckpt/demo-pretrain-moe"}
    assert [lg["init_args"]["name"] for lg in moe["trainer"].pop("logger")] == ["demo-pretrain-moe"] * 2
    dense["trainer"].pop("logger")
    assert moe["trainer"] == dense["trainer"]
    # it builds through the CLI (here over the tiny 2-layer, 32-wide BERT: layer 1 becomes 8 experts; the
    # Matryoshka dims cut to its width)
    cli = cli_main(["--config", str(REPO / "configs/demo/pretrain-moe.yaml"), "--model.init_from", str(tiny_bert_dir),
                    "--model.teacher", str(tiny_bert_dir), "--data.train_dir", str(pair_shards),
                    "--model.matryoshka_dims", "[32, 16, 8]", "--trainer.logger", "false"], run=False)
    assert cli.model.model.config.moe == want and cli.model.model.config.moe_layers == [1]
    assert cli.model.model.encoder.layer[1].moe.experts.intermediate_weight.shape[0] == 8
