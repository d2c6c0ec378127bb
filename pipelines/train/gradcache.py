# Copyright ropebert contributors. Apache-2.0.
"""GradCache (Gao et al., 2021): a contrastive step whose memory does not grow with the batch.

1. Embed every group of the batch (queries, positives, hard negatives) chunk by chunk WITHOUT a graph,
   recording the RNG state before each chunk.
2. Compute the loss on the detached embeddings (leaves that require grad) and backpropagate it to them: the
   gradient of the loss w.r.t. every embedding ("the cache"). Loss-side parameters (a learnable temperature)
   get their gradient here.
3. Re-run each chunk WITH a graph from its recorded RNG state (same dropout masks as in 1) and backpropagate
   the cached gradient through it: sum(embedding * cached_grad).backward().

The parameter gradients equal those of one big forward/backward over the same chunks (tests/pipelines/train/
test_gradcache.py). Hard negatives are a group like any other, so they are never dropped.

Per-example loss terms (e.g. token-level alignment of hidden states to a teacher) are local to each chunk: the
embed function may return `(embeddings, aux_loss)`, where aux_loss is that chunk's (already weighted and
normalised) scalar contribution. It is ignored in the graph-less pass 1 and added to the surrogate in pass 3,
so it is backpropagated inside each chunk's replay and nothing large (hidden states) is ever cached. Without
GradCache it is added to the loss. StepResult.loss includes it; stats["aux"] holds its sum.

Several embeddings per text (2-D Matryoshka: the pooled output of several layers) are one (N, S, D) tensor per
group: pass 1 caches all S of them, the loss sees them together, and one replay per chunk backpropagates the
cached gradient of every layer's embedding through the same graph (sum over S and D of embedding * gradient).

Gradient synchronisation is explicit: `allreduce_gradients` issues ONE all-reduce per optimizer step over a
flat buffer of every gradient, after all chunks are done. ropebert's DDP strategy (pipelines/strategy.py)
does not wrap the model in torch DDP, so no per-chunk reducer hooks fire (the per-chunk syncs that hang
sentence-transformers' cached losses under DDP cannot happen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from .loss import dist_info

Batch = dict[str, torch.Tensor]  # {"input_ids": (N, L), "attention_mask": (N, L)}


class RngState:
    """CPU + (current) CUDA generator state, captured and restored together."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if device.type == "cuda":
            self.device = device
            self.cuda = torch.cuda.get_rng_state(device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def split_batch(batch: Batch, chunk_size: Optional[int]) -> list[Batch]:
    """Cut a tokenised batch into row chunks of at most chunk_size; each chunk is trimmed to its own longest
    sequence (right padding), so short chunks do not pay for the batch's longest text."""
    n = batch["input_ids"].shape[0]
    size = n if not chunk_size or chunk_size >= n else int(chunk_size)
    out = []
    for s in range(0, n, size):
        ids, mask = batch["input_ids"][s : s + size], batch["attention_mask"][s : s + size]
        L = int(mask.sum(-1).max()) if mask.numel() else 0
        out.append({"input_ids": ids[:, : max(1, L)], "attention_mask": mask[:, : max(1, L)]})
    return out


@dataclass
class StepResult:
    loss: torch.Tensor  # detached scalar
    stats: dict = field(default_factory=dict)
    finite: bool = True
    tokens: int = 0  # real (non-padding) tokens embedded, all groups


EmbedFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
# (ids, mask) -> (N, D) or (N, S, D) embeddings (S per text, e.g. several layers), or (that, scalar aux loss of
# these rows)


def _split(out) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)
LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict]]


def _agree_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (all ranks must take the same branch)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    world, _ = dist_info()
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0.0)


def contrastive_step(
    embed: EmbedFn,
    groups: dict[str, Batch],
    loss_fn: LossFn,
    *,
    chunk_size: Optional[int],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> StepResult:
    """Forward + backward of one contrastive batch, with GradCache when chunk_size is set.

    embed: the encoder's pooled, normalised embedding function: (N, D), or (N, S, D) with S embeddings per text.
    groups: ordered name -> tokenised batch (e.g. query, passage, negatives).
    loss_fn: {name: (N, D) or (N, S, D) embeddings} -> (scalar loss, stats).
    chunk_size: rows per chunk for GradCache; None (or >= every group's size) embeds each group in one forward
        with its graph and backpropagates the loss directly (no cache).
    backward: how to backpropagate a scalar (Lightning's manual_backward in training).

    Parameter gradients are accumulated into .grad (not synchronised: see allreduce_gradients). When the loss
    is not finite on some rank, no parameter gradient is produced on any rank and finite=False.
    """
    tokens = sum(int(b["attention_mask"].sum()) for b in groups.values())
    if chunk_size is None or all(b["input_ids"].shape[0] <= chunk_size for b in groups.values()):
        embs, aux = {}, None
        for name, b in groups.items():
            embs[name], a = _split(embed(b["input_ids"], b["attention_mask"]))
            if a is not None:
                aux = a if aux is None else aux + a
        loss, stats = loss_fn(embs)
        if aux is not None:
            stats = dict(stats, aux=aux.detach())
            loss = loss + aux
        if not _agree_finite(loss.detach()):
            return StepResult(loss.detach(), stats, finite=False, tokens=tokens)
        backward(loss)
        return StepResult(loss.detach(), stats, finite=True, tokens=tokens)

    # 1. graph-less embeddings, RNG state recorded per chunk
    chunks: dict[str, list[Batch]] = {name: split_batch(b, chunk_size) for name, b in groups.items()}
    states: dict[str, list[RngState]] = {}
    reps: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, parts in chunks.items():
            states[name], outs = [], []
            for c in parts:
                states[name].append(RngState(c["input_ids"].device))
                outs.append(_split(embed(c["input_ids"], c["attention_mask"]))[0])
            reps[name] = torch.cat(outs, dim=0).detach().requires_grad_(True)
    after = RngState(next(iter(reps.values())).device)

    # 2. loss on the cached embeddings -> gradient w.r.t. every embedding
    loss, stats = loss_fn(reps)
    if not _agree_finite(loss.detach()):
        return StepResult(loss.detach(), stats, finite=False, tokens=tokens)
    backward(loss)
    cache = {name: r.grad.detach() for name, r in reps.items()}

    # 3. replay each chunk with its graph and push the cached gradient (+ the chunk's own aux loss) through it
    aux_total = None
    for name, parts in chunks.items():
        start = 0
        for c, st in zip(parts, states[name]):
            n = c["input_ids"].shape[0]
            st.restore()
            e, aux = _split(embed(c["input_ids"], c["attention_mask"]))
            surrogate = (e.float() * cache[name][start : start + n]).sum()  # every cached embedding of the rows
            if aux is not None:
                surrogate = surrogate + aux
                aux_total = aux.detach() if aux_total is None else aux_total + aux.detach()
            backward(surrogate)
            start += n
    after.restore()
    total = loss.detach()
    if aux_total is not None:
        stats = dict(stats, aux=aux_total)
        total = total + aux_total
    return StepResult(total, stats, finite=True, tokens=tokens)


def allreduce_gradients(params: Iterable[torch.nn.Parameter]) -> int:
    """Average gradients over ranks with ONE all-reduce of a flat buffer; returns the number of collective calls
    issued (0 without a process group, else 1). Parameters without a gradient contribute zeros (and receive
    the average), so every rank reduces the same layout."""
    world, _ = dist_info()
    params = [p for p in params if p.requires_grad]
    if world == 1 or not params:
        return 0
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise RuntimeError(f"allreduce_gradients: mixed parameter dtypes {dtypes}; keep master weights in one dtype")
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
    return 1
