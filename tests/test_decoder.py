"""The torch decoder against the reference generator: tokens, finish verdicts, log-probabilities, the
one-step-behind report, the Triton fast path (under the interpreter on CPU), fused projections."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from conftest import FIXTURES, Golden
from engine.backends.base import DecodeRequest
from engine.backends.decoder_torch import TorchDecoder, ladder, packed_length
from engine.checkpoint import build_model, resolve
from engine.kernels import paged_attention
from runtime.scheduler import BlockAllocator

TINY = Golden(FIXTURES / "tiny-canary-qwen")
BS = 16


@pytest.fixture(scope="module")
def model_tok():
    model, tok = build_model(resolve(TINY.root / "model", TINY.root / "llm"))
    return model, tok


def make_requests(model, tok, n, seed=0, max_new=(3, 9, 14)):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n):
        pre = torch.randint(0, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        post = torch.randint(0, 200, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g).tolist()
        audio = torch.randn(int(torch.randint(3, 40, (1,), generator=g)), model.cfg.llm.hidden_size, generator=g)
        reqs.append(DecodeRequest(i, pre, audio * 0.5, post, max_new[i % len(max_new)]))
    return reqs


def reference(model, tok, req, eos):
    """Greedy ids and per-token log-probabilities of one request from the exact reference generator."""
    ids = req.pre_ids + [tok.audio_id] + req.post_ids
    embeds, mask = model.splice([ids], tok.audio_id, [req.audio])
    (gen,) = model.generate(embeds, mask, req.max_new_tokens, eos, tok.pad_id, return_logits=True)
    lp = torch.log_softmax(gen.step_logits, -1).gather(1, torch.tensor(gen.token_ids)[:, None])[:, 0]
    return gen.token_ids, gen.finished, lp.tolist()


def drive(dec, reqs, arrive=None, max_steps=200):
    """Admit requests at their arrival steps, step, release on the decoder's verdict; returns per request
    (tokens, reason, logprobs, step of the verdict)."""
    alloc = BlockAllocator(dec.num_blocks, BS)
    arrive = arrive or [0] * len(reqs)
    got = {r.request_id: [[], None, [], None] for r in reqs}
    for step in range(max_steps):
        for r, t in zip(reqs, arrive):
            if t == step:
                r.blocks = alloc.allocate(-(-(r.prompt_len + r.max_new_tokens) // BS))
                dec.add(r)
        out = dec.step()
        for rid, toks in out.items():
            assert got[rid][1] is None, f"request {rid} got tokens after its verdict"
            got[rid][0] += toks
            got[rid][2] += dec.logprobs.pop(rid)
        for rid in list(dec.finished):
            assert rid in out, f"request {rid}: the verdict must come with its last token"
            got[rid][1], got[rid][3] = dec.finished.pop(rid), step
            dec.release(rid)
            alloc.free(next(r.blocks for r in reqs if r.request_id == rid))
        if step >= max(arrive) and all(v[1] for v in got.values()):
            break
    assert not dec.running and not dec.pending and dec.active == 0
    return got


def check(model, tok, reqs, got, eos):
    for r in reqs:
        ids, finished, lps = reference(model, tok, r, eos)
        toks, reason, got_lps, _ = got[r.request_id]
        assert toks == ids, r.request_id
        assert reason == ("stop" if finished else "length")
        torch.testing.assert_close(torch.tensor(got_lps), torch.tensor(lps), atol=1e-4, rtol=1e-4)


def eos_of(model, tok, reqs):
    """An eos id that some requests produce (the first token of the first request), so both verdicts occur."""
    return reference(model, tok, reqs[0], -1)[0][1]


def test_ladder_keeps_graphs_few():
    assert ladder(256)[:5] == [1, 2, 4, 8, 16] and len(ladder(256)) == 20 and len(ladder(128)) == 12
    assert ladder(3) == [1, 2, 3]


@pytest.mark.parametrize("lag", [False, True])
def test_reference_path_matches_generate(model_tok, lag):
    model, tok = model_tok
    reqs = make_requests(model, tok, 6)
    eos = eos_of(model, tok, reqs)
    dec = TorchDecoder(model, 64, BS, 4, 256, eos)
    dec._lag = lag  # the CUDA behaviour: reports read one step behind
    got = drive(dec, reqs, arrive=[0, 0, 1, 3, 3, 9])
    check(model, tok, reqs, got, eos)
    assert {v[1] for v in got.values()} == {"stop", "length"}
    assert model.llm.fused
    assert dec.prefill_tokens == sum(r.prompt_len for r in reqs)
    assert all(rows == 1 and n == packed_length(n) for rows, n in dec.prefill_shapes)  # packed rows
    lens = [r.prompt_len for r in reqs]  # one packed prefill per arrival step: 0, 1, 3, 9
    assert [t for *_, t in dec.prefill_log] == [lens[0] + lens[1], lens[2], lens[3] + lens[4], lens[5]]
    assert dec.prefill_padded_tokens == sum(n - t for _, n, t in dec.prefill_log) > 0


@pytest.mark.skipif(not paged_attention.available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="triton is not installed, or a GPU compiles the kernels (see the GPU test below)")
def test_triton_path_matches_reference_path(model_tok):
    """The fast path's logic (padded ladder batch, store kernel, paged attention) on CPU, fp32."""
    model, tok = model_tok
    reqs = make_requests(model, tok, 5, seed=1, max_new=(4, 7))
    eos = eos_of(model, tok, reqs)
    dec = TorchDecoder(model, 64, BS, 5, 256, eos, fast=True, num_splits=3)
    got = drive(dec, reqs, arrive=[0, 1, 1, 2, 6])
    check(model, tok, reqs, got, eos)


def test_packed_length_keeps_shapes_few_and_padding_small():
    lengths = [packed_length(t) for t in range(1, 8193)]
    assert all(n >= t for t, n in zip(range(1, 8193), lengths)) and lengths == sorted(lengths)
    assert len(set(lengths)) <= 16
    assert all(n - t < (256 if t <= 2048 else 512 if t <= 4096 else 1024) for t, n in zip(range(1, 8193), lengths))
    assert packed_length(20000) >= 20000  # one over-long prompt admitted alone still gets a row


def _slots(dec, r):
    p = torch.arange(r.prompt_len)
    return torch.tensor(r.blocks)[p // BS] * BS + p % BS


def test_packed_prefill_equals_each_prompt_alone(model_tok):
    """One packed prefill of mixed lengths (a 1-frame audio prompt among them) gives each request the same
    first token, log-probability and cached K/V as prefilling it alone."""
    model, tok = model_tok
    reqs = make_requests(model, tok, 5, seed=3)
    reqs[1].audio = reqs[1].audio[:1]  # one audio frame
    reqs[3].pre_ids, reqs[3].post_ids = reqs[3].pre_ids[:1], []
    alloc = BlockAllocator(64, BS)
    for r in reqs:
        r.blocks = alloc.allocate(-(-(r.prompt_len + r.max_new_tokens) // BS))
    packed = TorchDecoder(model, 64, BS, 8, 256, -1)
    for r in reqs:
        packed.add(r)
    first = packed.step()
    assert packed.prefill_shapes == {(1, packed_length(sum(r.prompt_len for r in reqs)))}
    for r in reqs:
        alone = TorchDecoder(model, 64, BS, 8, 256, -1)
        alone.add(r)
        assert alone.step()[r.request_id] == first[r.request_id]
        assert alone.logprobs[r.request_id] == pytest.approx(packed.logprobs[r.request_id], rel=1e-5)
        slots = _slots(alone, r)
        for layer in range(model.cfg.llm.num_layers):
            for a, b in ((alone.kv.k, packed.kv.k), (alone.kv.v, packed.kv.v)):
                torch.testing.assert_close(a[layer][slots], b[layer][slots], atol=1e-5, rtol=1e-5)
                assert a[layer][slots].abs().sum() > 0


OLD_VARLEN = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in (
    "query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")] + [inspect.Parameter(
        n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in (("is_causal", False),
                                                                          ("return_aux", None))])


@pytest.mark.parametrize("signature", ["installed", "2.9"])
def test_varlen_adapter_packs_for_torch_varlen_attn(model_tok, monkeypatch, signature):
    """The CUDA half-precision path's call into torch.nn.attention.varlen (flash only, so not runnable on CPU):
    a stand-in with the installed torch's signature (or the older is_causal one, without GQA or scale)
    checks the arguments and computes each segment with causal SDPA; the decoder must then give the same
    tokens and K/V as its per-segment path."""
    from torch.nn.attention import varlen

    from engine.backends.decoder_torch import _varlen_attention

    sig = inspect.signature(varlen.varlen_attn) if signature == "installed" else OLD_VARLEN
    calls = []

    def stand_in(*args, **kw):
        a = sig.bind(*args, **kw).arguments
        q, k, v, cu = a["query"], a["key"], a["value"], a["cu_seq_q"]
        causal = ((-1, 0), None) if "window_size" in sig.parameters else (None, True)
        assert (a.get("window_size"), a.get("is_causal")) == causal
        assert cu.dtype == torch.int32 and a["cu_seq_k"] is cu and q.shape[0] == int(cu[-1])
        assert a["max_q"] == a["max_k"] == int((cu[1:] - cu[:-1]).max())
        gqa = a.get("enable_gqa", False)
        assert gqa == (k.shape[1] != q.shape[1])
        b = cu.tolist()
        out = [torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True,
            scale=a.get("scale"), enable_gqa=gqa) for s, e in zip(b[:-1], b[1:])]
        calls.append(gqa)
        return torch.cat(out, 1).transpose(0, 1)  # [T, h, hd]

    stand_in.__signature__ = sig
    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    model, tok = model_tok
    reqs = make_requests(model, tok, 4, seed=4)
    alloc = BlockAllocator(64, BS)
    for r in reqs:
        r.blocks = alloc.allocate(-(-(r.prompt_len + r.max_new_tokens) // BS))
    decs = [TorchDecoder(model, 64, BS, 8, 256, -1) for _ in range(2)]
    decs[1]._varlen = _varlen_attention()
    outs = []
    for d in decs:
        for r in reqs:
            d.add(r)
        outs.append(d.step())
    assert calls == [signature == "installed"] * model.cfg.llm.num_layers  # 2.9: kv heads repeated instead
    assert outs[0] == outs[1]
    for r in reqs:
        slots = _slots(decs[0], r)
        torch.testing.assert_close(decs[1].kv.k[-1][slots], decs[0].kv.k[-1][slots])
        torch.testing.assert_close(decs[1].kv.v[-1][slots], decs[0].kv.v[-1][slots])


def test_fused_projections_match_unfused():
    model, _ = build_model(resolve(TINY.root / "model", TINY.root / "llm"))
    x = torch.randn(2, 7, model.cfg.llm.hidden_size)
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        ref = model.llm(x, pos, None)
        names = sorted(dict(model.named_parameters()))
        model.llm.fuse()
        assert sorted(dict(model.named_parameters())) == names  # checkpoint names unchanged
        torch.testing.assert_close(model.llm(x, pos, None), ref, atol=1e-5, rtol=1e-5)
        attn = model.llm.layers[0].self_attn
        assert attn.q_proj.weight.data_ptr() == attn._qkv.weight.data_ptr()  # a view, not a copy
        model.llm.merge_lora()  # re-fuses without the adapters
        assert attn._qkv.lora_A is None
        torch.testing.assert_close(model.llm(x, pos, None), ref, atol=1e-4, rtol=1e-4)


def test_bad_requests_are_refused(model_tok):
    model, tok = model_tok
    dec = TorchDecoder(model, 8, BS, 2, 64, 0)
    r = make_requests(model, tok, 1)[0]
    with pytest.raises(ValueError, match="needs reserved KV blocks"):
        dec.add(r)
    r.blocks = [1]
    with pytest.raises(ValueError, match="blocks hold fewer than"):
        dec.add(r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="compiled Triton kernels need a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("graphs", [False, True])
def test_compiled_fast_path_on_gpu_matches_generate(graphs):
    """The compiled kernels and CUDA graphs, in fp32 (TF32 off) so ids must equal the reference generator's."""
    from engine.backends.cuda_settings import configure

    model, tok = build_model(resolve(TINY.root / "model", TINY.root / "llm"), device="cuda")
    configure(model.device, model.dtype)
    reqs = make_requests(model, tok, 5, seed=2, max_new=(5, 11))
    for r in reqs:
        r.audio = r.audio.cuda()
    eos = eos_of(model, tok, reqs)
    dec = TorchDecoder(model, 64, BS, 8, 256, eos, fast=True, cuda_graphs=graphs)
    assert bool(dec.graphs) == graphs
    got = drive(dec, reqs, arrive=[0, 0, 2, 3, 7])
    check(model, tok, reqs, got, eos)


def test_cuda_settings_choice_on_cpu():
    from torch.nn.attention import SDPBackend

    from engine.backends.cuda_settings import configure, sdpa_backends

    assert configure("cpu", torch.float32)["tf32"] is False
    assert sdpa_backends(torch.float32) == [SDPBackend.MATH]
    assert SDPBackend.CUDNN_ATTENTION not in sdpa_backends(torch.bfloat16)
