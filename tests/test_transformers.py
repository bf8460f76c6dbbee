"""The transformers backend against transformers' own attention: SDPA for dense causal, eager attention
with the pattern's dense mask for sparse patterns; greedy generation, per-layer patterns, left padding,
chunked prefill and the static cache. Tiny random models on the CPU (the op's blocked backend)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import spdsl
from spdsl.resources import data_path

transformers = pytest.importorskip("transformers")
from spdsl.integrations.transformers import register  # noqa: E402

# unit 4 so that the pattern cuts at these lengths (power's reach at unit 256 would be dense here)
POWER = spdsl.compile(
    "pattern tiny_power(window = 2, sinks = 1) { unit 4 causal attend sink(sinks) | local(window) | powers(2) }"
)
STREAM = spdsl.compile("pattern tiny_stream() { unit 4 causal attend sink(1) | local(2) }")
CAUSAL = spdsl.load(data_path("patterns/causal.spd"))
VOCAB = 97
ROOT = Path(__file__).resolve().parents[1]


def tiny(arch: str, layers: int = 2):
    """A random Llama (Hq 4 / Hkv 2) or Qwen2 (Hq 4 / Hkv 1, qkv biases) model, head dim 16, fp32."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(num_key_value_heads=1, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    return model.eval()


def prompt(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model, impl: str, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


def generate(model, impl: str, ids, n: int = 16, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    return out[:, ids.shape[1] :]


def additive_mask(pattern, q_len: int, kv_len: int) -> torch.Tensor:
    keep = pattern.dense_mask(q_len, kv_len)
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None]


def layer_mask(per_layer: dict, default, layer: int, heads, q_len: int, kv_len: int) -> torch.Tensor:
    """The layer's dense mask: [q_len, kv_len], or [Hq, q_len, kv_len] for per-head patterns (a list)."""
    p = per_layer.get(layer, default)
    if isinstance(p, list):
        masks = [(CAUSAL if x is None else x).dense_mask(q_len, kv_len) for x in p]
        return torch.stack([masks[h] for h in heads])
    return (CAUSAL if p is None else p).dense_mask(q_len, kv_len)


def oracle(default, per_layer=None, heads=None):
    """Registers eager masked attention (the layer's pattern as a dense mask, fp64 softmax) as 'oracle';
    ``default`` may be a list of patterns with ``heads`` (each query head's index in it)."""
    per_layer = per_layer or {}

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        q_len, kv_len = query.shape[2], key.shape[2]
        keep = layer_mask(per_layer, default, module.layer_idx, heads, q_len, kv_len).to(query.device)
        rep = query.shape[1] // key.shape[1]
        k, v = (t.repeat_interleave(rep, dim=1).double() for t in (key, value))
        s = (query.double() @ k.transpose(-1, -2)) * scaling
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
        return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), None

    transformers.AttentionInterface.register("oracle", attend)
    return "oracle"


def real_tokens_are_cut(pattern, n: int) -> bool:
    keep, causal = pattern.dense_mask(n, n), CAUSAL.dense_mask(n, n)
    return bool((causal & ~keep).any())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_causal_equals_sdpa(arch):
    model, ids = tiny(arch), prompt(37)
    name = register(CAUSAL, name="spdsl_dense")
    torch.testing.assert_close(logits(model, name, ids), logits(model, "sdpa", ids), atol=2e-5, rtol=1e-4)
    assert generate(model, name, ids).tolist() == generate(model, "sdpa", ids).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_power_equals_eager_with_its_dense_mask(arch):
    model, ids = tiny(arch), prompt(45)
    assert real_tokens_are_cut(POWER, 45)
    name = register(POWER, name="spdsl_power")
    want = logits(model, "eager", ids, attention_mask=additive_mask(POWER, 45, 45))
    torch.testing.assert_close(logits(model, name, ids), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_power_greedy_generation_decodes_like_the_oracle(arch):
    """16 decode steps (q_len 1: the decode path) against eager masked attention recomputed each step."""
    model, ids = tiny(arch), prompt(29, seed=3)
    name = register(POWER, name="spdsl_power")
    got = generate(model, name, ids)
    seq = ids
    for _ in range(16):  # the oracle: the whole sequence again, no cache, mask from the pattern
        n = seq.shape[1]
        nxt = logits(model, "eager", seq, attention_mask=additive_mask(POWER, n, n))[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert got.tolist() == seq[:, 29:].tolist()
    assert real_tokens_are_cut(POWER, 45)


def test_decode_logits_match_the_oracle_step_by_step():
    model, ids = tiny("llama"), prompt(33, seed=4)
    name, ref = register(POWER, name="spdsl_power"), oracle(POWER)
    model.set_attn_implementation(name)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    for i, step in enumerate(out.logits):
        want = logits(model, ref, seq[:, : 33 + i])[:, -1]
        torch.testing.assert_close(step, want, atol=2e-5, rtol=1e-4)


def test_chunked_prefill_equals_one_prefill():
    model, ids = tiny("llama"), prompt(50, seed=5)
    name = register(POWER, name="spdsl_power")
    full = logits(model, name, ids)
    cache = transformers.DynamicCache(config=model.config)
    parts = [logits(model, name, ids[:, a:b], past_key_values=cache) for a, b in ((0, 21), (21, 22), (22, 50))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-4)


def test_per_layer_patterns():
    model, ids = tiny("qwen2", layers=3), prompt(41, seed=6)
    layers = {0: None, 2: STREAM}
    name, ref = register(POWER, name="spdsl_mixed", layers=layers), oracle(POWER, layers)
    torch.testing.assert_close(logits(model, name, ids), logits(model, ref, ids), atol=2e-5, rtol=1e-4)
    assert generate(model, name, ids, 8).tolist() == generate(model, ref, ids, 8).tolist()
    # and the layers differ for real: all-power gives other logits
    assert not torch.allclose(logits(model, register(POWER, name="spdsl_power"), ids), logits(model, ref, ids))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_per_head_patterns(arch):
    """heads=: each query head under its own pattern (llama: each GQA group mixes both; qwen2: one
    kv head for all four), with the first layer dense; prefill and 8 greedy decode steps."""
    model, ids = tiny(arch, layers=2), prompt(43, seed=12)
    heads, layers = [0, 1, 1, 0], {0: None}
    name = register([POWER, STREAM], heads=heads, layers=layers, name="spdsl_heads")
    ref = oracle([POWER, STREAM], layers, heads)
    want = logits(model, ref, ids)
    torch.testing.assert_close(logits(model, name, ids), want, atol=2e-5, rtol=1e-4)
    assert generate(model, name, ids, 8).tolist() == generate(model, ref, ids, 8).tolist()
    # the heads differ for real: all-power or all-stream gives other logits ("oracle" is re-registered)
    for single in (POWER, STREAM):
        assert not torch.allclose(logits(model, oracle(single, layers), ids), want)


def test_per_head_register_refusals():
    with pytest.raises(TypeError, match="needs heads="):
        register([POWER, STREAM])
    with pytest.raises(TypeError, match="must be a list of patterns"):
        register(POWER, heads=[0, 1])
    with pytest.raises(ValueError, match="indices run from 0 to 1"):
        register([POWER, STREAM], heads=[0, 2])
    model = tiny("llama")
    name = register([POWER, STREAM], heads=[0, 1, 1], name="spdsl_heads_bad")
    with pytest.raises(ValueError, match="heads of length 3, but q has 4 heads"):
        logits(model, name, prompt(20))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padded_batch_equals_each_sequence_alone(arch):
    model = tiny(arch)
    name = register(POWER, name="spdsl_power")
    seqs = [prompt(n, seed=10 + n)[0] for n in (26, 39, 17)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :], mask[b, width - len(s) :] = s, 1
    batch = logits(model, name, ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    gen = generate(model, name, ids, 8, attention_mask=mask)
    for b, s in enumerate(seqs):
        alone = logits(model, name, s[None])
        torch.testing.assert_close(batch[b : b + 1, width - len(s) :], alone, atol=2e-5, rtol=1e-4)
        assert gen[b].tolist() == generate(model, name, s[None], 8)[0].tolist()


def test_static_cache_generates_like_the_dynamic_cache():
    model, ids = tiny("llama"), prompt(31, seed=7)
    name = register(POWER, name="spdsl_power")
    want = generate(model, name, ids)
    assert generate(model, name, ids, cache_implementation="static").tolist() == want.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("per_head", [False, True], ids=["one-pattern", "per-head"])
def test_static_cache_under_torch_compile(per_head):
    model, ids = tiny("llama"), prompt(31, seed=7)
    name = (
        register([POWER, STREAM], heads=[0, 1, 1, 0], name="spdsl_ph")
        if per_head
        else register(POWER, name="spdsl_power")
    )
    want = generate(model, name, ids, 8)
    model.forward = torch.compile(model.forward, fullgraph=False)
    assert generate(model, name, ids, 8, cache_implementation="static").tolist() == want.tolist()


def test_refusals_name_what_is_supported():
    model, ids = tiny("llama"), prompt(20)
    name = register(POWER, name="spdsl_power")
    with pytest.raises(TypeError, match="4-D custom mask"):
        logits(model, name, ids, attention_mask=additive_mask(POWER, 20, 20))
    holes = torch.ones(1, 20, dtype=torch.long)
    holes[0, 5] = 0
    with pytest.raises(ValueError, match="left padding only"):
        logits(model, name, ids, attention_mask=holes)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="attention dropout"):
        model(ids)
    with pytest.raises(ValueError, match="identifier"):
        register(POWER, name="not a name")
    with pytest.raises(ValueError, match="transformers' own"):
        register(POWER, name="sdpa")
    with pytest.raises(ValueError, match="contains 'flash'"):
        register(POWER, name="my_flash_power")
    with pytest.raises(ValueError, match="layer indices"):
        register(POWER, layers={-1: None})
    with pytest.raises(TypeError, match="layers\\[0\\] must be"):
        register(POWER, layers={0: 3})


def test_sliding_window_layers_are_refused():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    model = transformers.MistralForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="other than plain causal"):
        logits(model, register(POWER, name="spdsl_power"), prompt(20))


def test_the_hf_extra_pins_the_tested_range():
    import tomllib

    from spdsl.integrations import transformers as backend

    text = (ROOT / "pyproject.toml").read_text()
    assert f"transformers{backend.SUPPORTED}" in tomllib.loads(text)["project"]["optional-dependencies"]["hf"]
    with pytest.warns(UserWarning, match="tested with"):
        backend._check_version("4.50.0")


def test_generated_kernels_in_a_model_under_the_interpreter(tmp_path):
    """The Triton prefill and decode kernels (not the CPU backend) inside the model: the cache as
    transformers holds it, [B, Hkv, S, D] seen as [B, S, Hkv, D], decoded without a copy."""
    from tests.helpers import scoped_env

    model, ids = tiny("llama"), prompt(29, seed=8)
    want_logits = logits(model, oracle(POWER), ids)
    want = generate(model, "oracle", ids, 4)
    with scoped_env(TRITON_INTERPRET="1", SPDSL_CACHE_DIR=str(tmp_path)):
        pattern = spdsl.compile(POWER.source)  # a fresh module, imported with the interpreter on
        name = register(pattern, name="spdsl_interp")
        op = spdsl.build(pattern)
        assert op.module.interpreting()
        torch.testing.assert_close(logits(model, name, ids), want_logits, atol=2e-5, rtol=1e-4)
        assert generate(model, name, ids, 4).tolist() == want.tolist()


def test_per_head_kernels_in_a_model_under_the_interpreter(tmp_path):
    """The per-head prefill and decode kernels inside the model (a GQA group mixing two patterns)."""
    from tests.helpers import scoped_env

    model, ids, heads = tiny("llama"), prompt(29, seed=13), [1, 0, 0, 1]
    want_logits = logits(model, oracle([POWER, STREAM], heads=heads), ids)
    want = generate(model, "oracle", ids, 4)
    with scoped_env(TRITON_INTERPRET="1", SPDSL_CACHE_DIR=str(tmp_path)):
        patterns = [spdsl.compile(p.source) for p in (POWER, STREAM)]  # fresh modules, imported with the interpreter on
        name = register(patterns, heads=heads, name="spdsl_heads_interp")
        assert spdsl.build(patterns, heads=heads).module.interpreting()
        torch.testing.assert_close(logits(model, name, ids), want_logits, atol=2e-5, rtol=1e-4)
        assert generate(model, name, ids, 4).tolist() == want.tolist()


def test_the_example_runs(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr("sys.argv", ["transformers_power.py", "--prompt", "300", "--tokens", "3"])
    runpy.run_path(str(ROOT / "examples" / "transformers_power.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["sdpa", "spdsl"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["dense", "power"])
def test_gpu_bf16_logits_within_sdpas_own_error(which):
    """bf16 on the GPU (the Triton prefill and decode kernels): the error against an fp32 oracle is
    within 2x what transformers' SDPA makes in bf16 on the dense model."""
    model, ids = tiny("llama"), prompt(300, seed=9).cuda()
    pattern = CAUSAL if which == "dense" else spdsl.compile(POWER.source.replace("unit 4", "unit 32"))
    ref = oracle(pattern)
    want = logits(model.cuda().float(), ref, ids)
    dense_want = logits(model, oracle(CAUSAL), ids)
    name = register(pattern, name=f"spdsl_gpu_{which}")
    model.to(torch.bfloat16)
    got = logits(model, name, ids).float()
    sdpa_err = (logits(model, "sdpa", ids).float() - dense_want).norm() / dense_want.norm()
    err = (got - want).norm() / want.norm()
    assert err <= 2 * sdpa_err + 1e-3, (err, sdpa_err)
    assert generate(model, name, ids, 8).shape == (1, 8)
