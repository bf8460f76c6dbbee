"""Hugging Face transformers attention backend: a pattern (or one per layer, or per head) as ``attn_implementation``.

>>> from spdsl.integrations.transformers import register
>>> name = register("patterns/power.spd", layers={0: None, 1: None})   # doctest: +SKIP
>>> model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)   # doctest: +SKIP
>>> name = register([full, stream], heads=[0] * 8 + [1] * 24)   # per-head patterns   # doctest: +SKIP

How transformers calls attention, and what this backend does with each call:

* prefill and chunked prefill (q_len > 1): ``op(q, k, v)`` over the filled keys; queries are the
  last q_len of them, as the pattern's default ``q_offset`` says;
* decode (q_len 1): ``op.decode`` on the cache as transformers holds it ([B, Hkv, S, D] seen as
  [B, S, Hkv, D], no copy), with ``cache_seqlens`` from the cache -- no host synchronization, so a
  static cache under ``torch.compile`` works; only the filled positions count;
* GQA: the op takes Hq query heads over Hkv key heads directly (K/V are never repeated);
* the model's ``scaling`` is the softmax scale;
* left-padded batches (a 2-D ``attention_mask`` whose ones are one run per row): positions count
  from each sequence's first real token, as transformers' ``position_ids`` do; each padded sequence
  is run on its own slice (eager only: under ``torch.compile`` a padded batch is refused).
  Padded query rows return zeros.

Refused with a message (never a silently different result): 4-D custom masks, masks with holes,
attention dropout while training, caches that drop old keys (sliding-window layers), and
mask functions other than plain causal (``or_mask_function`` overlays, sliding or chunked layers).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..heads import resolve
from ..op import SparseAttention
from ..pattern import Pattern, as_pattern
from ..resources import data_path

#: The transformers versions this backend is tested with (``pip install spdsl[hf]``).
OLDEST, NEWEST_EXCLUDED = (5, 17), (5, 25)
SUPPORTED = f">={OLDEST[0]}.{OLDEST[1]},<{NEWEST_EXCLUDED[0]}.{NEWEST_EXCLUDED[1]}"


@dataclasses.dataclass
class SpdslMask:
    """What the mask hook hands each layer: where the queries sit, and the padding (None: no padding).

    ``seqlens`` [B] int32: filled cache positions, the new tokens included (``q_offset + q_len``);
    ``starts``: per sequence, the index of its first real token (a list of ints), only with padding.
    """

    q_offset: int | torch.Tensor
    q_len: int
    kv_offset: int
    seqlens: torch.Tensor
    starts: list[int] | None
    causal_only: bool

    # generate() builds the masks ahead of a compileable (static) cache's forward, which hands the
    # result to the mask functions again as if it were a 2-D padding mask: it passes through unchanged
    ndim = 2

    def to(self, *args, **kwargs) -> SpdslMask:
        return self


def _mask_hook(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """transformers' mask interface for spdsl names: no dense mask, a :class:`SpdslMask` instead."""
    from transformers.masking_utils import causal_mask_function

    if isinstance(attention_mask, SpdslMask):  # made by generate() ahead of this forward (see SpdslMask.ndim)
        return attention_mask
    device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else "cpu")
    seqlens = (torch.as_tensor(q_offset, device=device) + q_length).to(torch.int32).reshape(1).repeat(batch_size)
    starts = None
    if attention_mask is not None:
        starts = _padding_starts(attention_mask, q_offset, q_length)
    return SpdslMask(q_offset, q_length, kv_offset, seqlens, starts, mask_function is causal_mask_function)


def _padding_starts(mask: torch.Tensor, q_offset, q_len: int) -> list[int] | None:
    """Each row's first real token, None when nothing is padded; refuses masks that are not left padding."""
    mask = mask.bool()
    if torch.compiler.is_compiling():
        torch._assert_async(
            mask.all(), "spdsl's transformers backend: padded batches are not supported under torch.compile"
        )
        return None
    if bool(mask.all()):
        return None
    filled = int(q_offset) + q_len
    mask = mask[:, :filled]
    starts = mask.int().argmax(dim=1)
    arange = torch.arange(mask.shape[1], device=mask.device)
    if not bool((mask == (arange[None, :] >= starts[:, None])).all()):
        raise ValueError(
            "spdsl's transformers backend supports left padding only (each row of attention_mask: zeros, then "
            "ones to the end); this mask has zeros after a row's first one. Use left padding "
            "(tokenizer.padding_side = 'left') or run the sequences one at a time"
        )
    return starts.tolist()


class _Backend:
    """The attention function registered under one name: a pattern per layer, ops built once each.

    ``heads``: the default pattern is a tuple of patterns, and ``heads`` each query head's index in it.
    """

    def __init__(
        self,
        name: str,
        default: Pattern | tuple[Pattern, ...] | None,
        layers: Mapping[int, Pattern | None],
        heads: tuple[int, ...] | None = None,
    ):
        self.name = name
        self._patterns = {"default": default, **layers}
        self._heads = heads
        self._ops: dict[int, SparseAttention] = {}

    def op_for(self, layer: int | None) -> SparseAttention:
        pattern = self._patterns.get(layer, self._patterns["default"])
        if pattern is None:
            pattern = _dense_causal()
        key = id(pattern)
        op = self._ops.get(key)
        if op is None:
            from ..runtime import build

            per_head = isinstance(pattern, tuple)
            op = self._ops[key] = build(list(pattern), heads=self._heads) if per_head else build(pattern)
        return op

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if dropout and getattr(module, "training", False):
            raise ValueError(
                f"spdsl's transformers backend has no attention dropout (got dropout={dropout} in training); "
                "set config.attention_dropout = 0.0"
            )
        mask = self._check_mask(attention_mask, query)
        op = self.op_for(getattr(module, "layer_idx", None))
        if mask is None:
            out = op(query, key, value, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        if mask.starts is not None:
            return _padded(op, query, key, value, scaling, mask), None
        if query.shape[2] == 1:  # decode: the cache as transformers holds it, lengths on the device
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            return op.decode(q, k, v, mask.seqlens, scale=scaling), None
        filled = int(mask.q_offset) + query.shape[2]
        out = op(query, key[:, :, :filled], value[:, :, :filled], scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def _check_mask(self, mask, query) -> SpdslMask | None:
        if mask is None:  # no mask hook ran (a model calling attention directly): keys are the filled ones
            return None
        if not isinstance(mask, SpdslMask):
            raise TypeError(
                f"spdsl attention ({self.name!r}) got a {type(mask).__name__} attention mask; it takes the "
                "pattern from its .spd file and accepts only 2-D padding masks (a 4-D custom mask cannot be honoured)"
            )
        if not mask.causal_only:
            raise ValueError(
                f"spdsl attention ({self.name!r}): this layer asks for a mask other than plain causal (sliding "
                "window, chunked, or an or/and mask overlay); the pattern would replace it. Use spdsl only on "
                "full-attention layers"
            )
        if mask.kv_offset:
            raise ValueError(
                f"spdsl attention ({self.name!r}): the cache dropped the first {mask.kv_offset} keys (a sliding-window "
                "cache layer); the pattern needs every position. Use a DynamicCache or StaticCache of full layers"
            )
        if query.shape[2] != mask.q_len:
            raise ValueError(f"spdsl attention: {query.shape[2]} queries, but the mask was made for {mask.q_len}")
        return mask


def _padded(op: SparseAttention, query, key, value, scaling, mask: SpdslMask) -> torch.Tensor:
    """Left-padded batch: each sequence on its own slice, positions from its first real token."""
    B, Hq, Sq, D = query.shape
    filled = int(mask.q_offset) + Sq
    out = query.new_zeros(B, Sq, Hq, D)
    for b, start in enumerate(mask.starts):
        first = max(start - (filled - Sq), 0)  # query rows before the first real token are padding
        if first >= Sq:
            continue
        q = query[b : b + 1, :, first:]
        k, v = key[b : b + 1, :, start:filled], value[b : b + 1, :, start:filled]
        out[b, first:] = op(q, k, v, scale=scaling)[0].transpose(0, 1)
    return out


@functools.lru_cache(maxsize=1)
def _dense_causal() -> Pattern:
    from ..pattern import load

    return load(data_path("patterns/causal.spd"))


def _pattern(spec, what: str) -> Pattern | None:
    if spec is None:
        return None
    try:
        return as_pattern(Path(spec) if isinstance(spec, os.PathLike) else spec)
    except TypeError as e:
        raise TypeError(f"{what} must be a Pattern, a path to a .spd file or None (dense causal): {e}") from None


def _check_version(version: str) -> None:
    """Warn (not fail) outside the tested range: transformers' attention plumbing changes between minors."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return
    if not OLDEST <= major_minor < NEWEST_EXCLUDED:
        warnings.warn(
            f"spdsl's transformers backend is tested with transformers{SUPPORTED}, found {version}; "
            "if attention calls fail, install a tested version: pip install 'spdsl[hf]'",
            stacklevel=3,
        )


def register(
    pattern,
    *,
    name: str = "spdsl",
    layers: Mapping[int, object] | None = None,
    heads: Sequence[int] | None = None,
) -> str:
    """Register ``pattern`` as a transformers attention implementation; returns the name to use.

    Parameters
    ----------
    pattern:
        A :class:`~spdsl.Pattern`, a path to a ``.spd`` file, or None (dense causal); or, with
        ``heads``, a list of them (each may also be None: dense causal).
    name:
        The ``attn_implementation`` name (an identifier; registering it again replaces it).
    layers:
        Layer index -> pattern (same forms) for layers that differ; None means dense causal, e.g.
        ``{0: None, 1: None}`` keeps the first two layers dense.
    heads:
        Per-head patterns (``spdsl.build(patterns, heads=...)``): for each of the model's query heads,
        the index in ``pattern`` (a list) of the pattern it uses, in every layer that ``layers`` does
        not name. One kernel launch serves all heads; heads of one GQA group may differ.

    Returns
    -------
    str
        ``name``, for ``from_pretrained(..., attn_implementation=name)`` or
        ``model.set_attn_implementation(name)``.
    """
    try:
        from transformers import AttentionInterface
        from transformers import __version__ as transformers_version
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            f"spdsl.integrations.transformers needs transformers{SUPPORTED}: pip install 'spdsl[hf]'"
        ) from e
    _check_version(transformers_version)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be an identifier such as 'spdsl', got {name!r}")
    if name in ("eager", "sdpa", "flex_attention") or name.startswith("flash_attention"):
        raise ValueError(f"name {name!r} is one of transformers' own attention implementations; choose another")
    if "flash" in name.lower():  # transformers would look for a FlashAttention kernel of that name on the hub
        raise ValueError(f"name {name!r} contains 'flash', which transformers reserves for FlashAttention kernels")
    if layers is not None and not isinstance(layers, Mapping):
        raise TypeError(f"layers must map layer index -> pattern or None, got {type(layers).__name__}")
    per_layer = {}
    for i, spec in (layers or {}).items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"layers keys are layer indices (ints >= 0), got {i!r}")
        per_layer[i] = _pattern(spec, f"layers[{i}]")
    if heads is None:
        if isinstance(pattern, list | tuple):
            raise TypeError("a list of patterns needs heads=[pattern index of each query head]")
        default = _pattern(pattern, "pattern")
    else:
        if not isinstance(pattern, list | tuple):
            raise TypeError(
                f"with heads=, pattern must be a list of patterns (one per index), got {type(pattern).__name__}"
            )
        default = tuple(_pattern(p, f"pattern[{i}]") or _dense_causal() for i, p in enumerate(pattern))
        heads = resolve(list(default), heads)[1]  # checked now, not at the first forward
        default = default if heads is not None else default[0]
    backend = _Backend(name, default, per_layer, heads)
    AttentionInterface.register(name, backend)
    AttentionMaskInterface.register(name, _mask_hook)
    return name
