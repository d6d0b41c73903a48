"""Parity with NeMo 3.0's own outputs (golden.safetensors), fp32 on CPU.

Tolerances are relative to the largest reference value. fp32 reordering noise is ~1e-7; a wrong operation
order (e.g. LoRA scale applied twice, RMSNorm in the wrong dtype, a missing mask) moves results by far more.
The mel features are the one exception: near-silent bins pass through log(), which turns FFT rounding noise
into ~3e-5 (NeMo's own result is that far from a float64 computation too), so their bound is looser and a
mean-error bound is added.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import pad_batch, rel_err

TOL = 1e-5
MEL_TOL, MEL_MEAN_TOL = 5e-5, 2e-6


def run_perception(model, waves):
    x, lens = pad_batch(waves)
    with torch.no_grad():
        return model.perception(x, lens)


def valid_rows(t: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Zero frames past each length ([B, T, ...] layout) so padding garbage is not compared."""
    m = torch.arange(t.shape[1])[None, :] < lens[:, None]
    return t * m.reshape(*m.shape, *([1] * (t.dim() - 2)))


def check_perception(golden, model, prefix, stems):
    g = golden.tensors
    mel, mel_lens, enc, enc_lens, proj = run_perception(model, [golden.audio(s) for s in stems])
    assert mel.shape == g[f"{prefix}.mel"].shape
    assert mel_lens.tolist() == g[f"{prefix}.mel_lens"].tolist()
    assert enc_lens.tolist() == g[f"{prefix}.enc_lens"].tolist() == g[f"{prefix}.proj_lens"].tolist()
    assert rel_err(mel, g[f"{prefix}.mel"]) < MEL_TOL
    assert (mel - g[f"{prefix}.mel"]).abs().mean().item() < MEL_MEAN_TOL
    assert rel_err(valid_rows(enc, enc_lens), valid_rows(g[f"{prefix}.enc"], enc_lens)) < TOL
    assert rel_err(valid_rows(proj, enc_lens), valid_rows(g[f"{prefix}.proj"], enc_lens)) < TOL
    return proj, enc_lens


def test_perception_padded_batch(golden, fp32_model):
    model, _ = fp32_model
    check_perception(golden, model, "batch", golden.stems)


def test_perception_single(golden, fp32_model):
    model, _ = fp32_model
    for stem in golden.stems:
        check_perception(golden, model, f"single.{stem}", [stem])


def test_prompt_ids(golden, fp32_model):
    _, tok = fp32_model
    special = golden.meta["special_ids"]
    assert tok.audio_id == special["audio_locator_tag"]
    assert tok.eos_id == special["eos_<|im_end|>"]
    assert tok.pad_id == special["pad_<|endoftext|>"]
    for stem in golden.stems:
        assert tok.prompt_ids() == golden.meta["per_utterance"][stem]["prompt_ids"]
        assert tok.prompt_ids() == golden.tensors[f"single.{stem}.prompt_ids"][0].tolist()


def generate(golden, model, tok, stems, return_logits=True):
    _, _, _, lens, proj = run_perception(model, [golden.audio(s) for s in stems])
    embeds, mask = model.splice([tok.prompt_ids()] * len(stems), tok.audio_id,
                                [proj[i, : lens[i]] for i in range(len(stems))])
    gens = model.generate(embeds, mask, golden.max_new_tokens, tok.eos_id, tok.pad_id, return_logits=return_logits)
    return embeds, mask, gens


def test_spliced_inputs_and_greedy_batch(golden, fp32_model):
    model, tok = fp32_model
    g = golden.tensors
    embeds, mask, gens = generate(golden, model, tok, golden.stems)
    assert torch.equal(mask, g["batch.attention_mask"])
    assert rel_err(embeds, g["batch.input_embeds"]) < TOL
    for i, stem in enumerate(golden.stems):
        ref = g[f"batch.gen_ids.{stem}"].tolist()
        assert gens[i].token_ids == ref, stem
        assert tok.decode(gens[i].token_ids) == golden.meta["per_utterance"][stem]["batch"]["text"]
        assert gens[i].finished == golden.meta["per_utterance"][stem]["batch"]["eos_produced"]
        assert rel_err(gens[i].step_logits, g["batch.gen_step_logits"][i, : len(ref)]) < TOL, stem


def test_greedy_single_and_teacher_forced(golden, fp32_model):
    model, tok = fp32_model
    g = golden.tensors
    for stem in golden.stems:
        embeds, mask, (gen,) = generate(golden, model, tok, [stem])
        assert rel_err(embeds, g[f"single.{stem}.input_embeds"]) < TOL
        assert gen.token_ids == g[f"single.{stem}.gen_ids"].tolist(), stem
        assert tok.decode(gen.token_ids) == golden.meta["per_utterance"][stem]["single"]["text"]
        assert rel_err(gen.step_logits, g[f"single.{stem}.gen_step_logits"][0]) < TOL
        # Teacher-forced: the whole sequence (prompt + generated ids) in one forward pass.
        ids = torch.tensor(gen.token_ids)
        full = torch.cat([embeds, model.embed_tokens(ids)[None]], 1)
        with torch.no_grad():
            logits = model.forward_logits(full, torch.ones(full.shape[:2], dtype=torch.bool))
        assert rel_err(logits, g[f"single.{stem}.logits"]) < TOL


def test_batch_invariance(golden, fp32_model):
    """An utterance gives the same ids alone and inside any padded batch, in any position."""
    model, tok = fp32_model
    alone = {s: generate(golden, model, tok, [s], return_logits=False)[2][0].token_ids for s in golden.stems}
    rng = random.Random(0)
    for _ in range(3):
        stems = rng.sample(golden.stems, rng.randint(2, len(golden.stems)))
        stems += rng.sample(stems, 1)  # a duplicate in the same batch
        rng.shuffle(stems)
        _, _, gens = generate(golden, model, tok, stems, return_logits=False)
        assert [g.token_ids for g in gens] == [alone[s] for s in stems]


def test_padding_does_not_change_features(golden, fp32_model):
    """Extra zero padding after an utterance (a longer batch partner) leaves every valid value unchanged."""
    model, _ = fp32_model
    w = golden.audio(golden.stems[1])
    _, _, _, lens, proj = run_perception(model, [w])
    x = torch.zeros(1, len(w) + 12345)
    x[0, : len(w)] = w
    with torch.no_grad():
        _, _, _, lens2, proj2 = model.perception(x, torch.tensor([len(w)]))
    assert torch.equal(lens, lens2)
    assert rel_err(proj2[:, : lens[0]], proj[:, : lens[0]]) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_golden(golden, dtype):
    """bf16/fp16 execution: features stay fp32; embeddings and first-step logits stay near the fp32 goldens."""
    model, tok = golden.load(dtype=dtype)
    assert model.perception.preprocessor.fb.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == dtype
    g = golden.tensors
    mel, _, _, lens, proj = run_perception(model, [golden.audio(s) for s in golden.stems])
    assert mel.dtype == torch.float32 and proj.dtype == dtype
    assert rel_err(mel, g["batch.mel"]) < MEL_TOL
    assert rel_err(valid_rows(proj.float(), lens), valid_rows(g["batch.proj"], lens)) < 0.05
    _, _, gens = generate(golden, model, tok, golden.stems)
    for i, gen in enumerate(gens):
        assert rel_err(gen.step_logits[0], g["batch.gen_step_logits"][i, 0]) < 0.05


def test_merged_lora_matches_unmerged(golden, fp32_model):
    model, tok = fp32_model
    merged, _ = golden.load(merge_lora=True)
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    g = golden.tensors
    for stem in golden.stems[:3]:
        embeds = g[f"single.{stem}.input_embeds"]
        ids = g[f"single.{stem}.gen_ids"]
        full = torch.cat([embeds, merged.embed_tokens(ids)[None]], 1)
        with torch.no_grad():
            logits = merged.forward_logits(full, torch.ones(full.shape[:2], dtype=torch.bool))
        assert rel_err(logits, g[f"single.{stem}.logits"]) < 1e-4
