"""The retrieval task, generated on the device, and its scoring against reach.

A sequence is random filler tokens with one needle: a value token at a position outside the sink
unit. After it, ``probes`` PROBE tokens sit at log-uniform and uniform distances; the label at
every probe is the needle's value, which appears nowhere else. Values and filler come from
disjoint vocabularies, so a probe that cannot see the needle's information can only guess: its
accuracy is exactly chance (1 / values). Loss is on probes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Vocab:
    """Token ids: 0 = PROBE, then ``values`` value tokens, then ``filler`` filler tokens."""

    values: int = 16
    filler: int = 256

    @property
    def size(self) -> int:
        return 1 + self.values + self.filler

    PROBE = 0

    def value(self, i):
        return 1 + i


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, S] long
    labels: torch.Tensor  # [B, S] long, -100 except after probes (causal-LM labels are shifted by one)
    needle: torch.Tensor  # [B] position of the value token
    probes: torch.Tensor  # [B, P] probe positions: the model's output at a probe must be the value
    value: torch.Tensor  # [B] the value's token id


def make_batch(batch: int, seq: int, unit: int, probes: int, vocab: Vocab, generator: torch.Generator,
               device="cpu") -> Batch:  # fmt: skip
    """``batch`` sequences of ``seq`` tokens; the needle never in the first ``unit`` tokens (the sink)."""
    g, dev = generator, device
    tokens = torch.randint(1 + vocab.values, vocab.size, (batch, seq), generator=g, device=dev)
    value = torch.randint(0, vocab.values, (batch,), generator=g, device=dev)
    # the needle leaves room for `probes` probes after it
    needle = torch.randint(unit, seq - 2 - probes, (batch,), generator=g, device=dev)
    room = seq - 2 - needle  # probes at needle+1 .. seq-2 (the label sits one after the probe)
    half = probes // 2
    u = torch.rand(batch, probes, generator=g, device=dev)
    log_d = torch.exp(u[:, :half] * torch.log(room[:, None].double()).float())  # log-uniform in [1, room]
    lin_d = 1 + u[:, half:] * (room[:, None] - 1)  # uniform in [1, room]
    dist = torch.cat([log_d, lin_d], 1).long().clamp(min=1)
    dist = torch.minimum(dist, room[:, None])
    pos = needle[:, None] + dist
    pos, _ = pos.sort(1)
    rows = torch.arange(batch, device=dev)[:, None]
    tokens[rows, pos] = vocab.PROBE
    tokens[torch.arange(batch, device=dev), needle] = vocab.value(value)
    labels = torch.full_like(tokens, -100)
    labels[rows, pos + 1] = vocab.value(value)[:, None]  # transformers predicts labels[t + 1] at t
    return Batch(tokens, labels, needle, pos, vocab.value(value))


def score(batch: Batch, predicted: torch.Tensor, reach: np.ndarray, hops: np.ndarray, unit: int) -> list[dict]:
    """One record per sequence: per probe, correct, reachable (needle's unit in the probe unit's
    reach set), hop count (0: never within the layers) and distance. Probes at the same position
    count once."""
    out = []
    tokens_pred = predicted.gather(1, batch.probes).cpu()  # the argmax of the logits at each probe
    labels = batch.value[:, None].expand_as(batch.probes).cpu()
    probes, needle = batch.probes.cpu().numpy(), batch.needle.cpu().numpy()
    for b in range(probes.shape[0]):
        pos, first = np.unique(probes[b], return_index=True)
        Q, K = pos // unit, needle[b] // unit
        out.append(
            {
                "correct": (tokens_pred[b, first] == labels[b, first]).numpy(),
                "reachable": reach[Q, K],
                "hops": hops[Q, K],
                "distance": pos - needle[b],
            }
        )
    return out


def bootstrap(values_per_seq: list[np.ndarray], reps: int = 1000, seed: int = 0) -> dict:
    """Mean over all probes with a 95% interval by resampling sequences (probes of one share a needle)."""
    kept = [v for v in values_per_seq if v.size]
    if not kept:
        return {"mean": None, "lo": None, "hi": None, "probes": 0, "sequences": 0}
    sums = np.array([v.sum() for v in kept], dtype=np.float64)
    counts = np.array([v.size for v in kept], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(kept), (reps, len(kept)))
    means = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(sums.sum() / counts.sum()), "lo": float(lo), "hi": float(hi),
            "probes": int(counts.sum()), "sequences": len(kept)}  # fmt: skip


def summarize(records: list[dict], values: int) -> dict:
    """Accuracy on reachable / unreachable pairs, by hop count and by log2 distance bin, with CIs."""

    def acc(select) -> dict:
        return bootstrap([r["correct"][select(r)] for r in records])

    hops = sorted({int(h) for r in records for h in r["hops"]})
    bins = sorted({int(np.log2(d)) for r in records for d in r["distance"]})
    return {
        "chance": 1.0 / values,
        "reachable": acc(lambda r: r["reachable"]),
        "unreachable": acc(lambda r: ~r["reachable"]),
        "by_hops": {str(h): acc(lambda r, h=h: r["hops"] == h) for h in hops},
        "by_distance_log2": {str(b): acc(lambda r, b=b: np.log2(r["distance"]).astype(int) == b) for b in bins},
    }
