"""Random-weight models in the release architecture, for benchmarks that need no download.

``release_dicts()`` gives the SALM and Qwen3 configs of nvidia/canary-qwen-2.5b (shared spec, model.md);
``small_dicts()`` the same architecture scaled down for CPU runs. ``random_model`` fills every parameter
and buffer with plausible random values (unit norm gains, fan-in-scaled weights, a Hann window, a positive
filterbank) so activations stay finite and decoding behaves like a real model's, not like a degenerate one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.config import ModelConfig  # noqa: E402
from engine.model import CanaryQwenModel  # noqa: E402
from engine.prompt import Tokenizer  # noqa: E402
from runtime.bench import machine_name  # noqa: E402,F401  (scripts import it from here)

# A byte-level BPE with the Qwen chat special tokens: enough for prompts and detokenisation.
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "tiny-canary-qwen" / "llm"


def release_dicts() -> tuple[dict, dict]:
    encoder = dict(feat_in=128, n_layers=32, d_model=1024, n_heads=8, ff_expansion_factor=4, conv_kernel_size=9,
                   subsampling="dw_striding", subsampling_factor=8, subsampling_conv_channels=256, xscaling=False,
                   self_attention_model="rel_pos", untie_biases=True, pos_emb_max_len=5000,
                   att_context_size=[-1, -1], conv_norm_type="batch_norm")
    pre = dict(sample_rate=16000, normalize="per_feature", window_size=0.025, window_stride=0.01, window="hann",
               features=128, n_fft=512, log=True, frame_splicing=1, dither=1e-5, pad_to=0, pad_value=0.0)
    salm = dict(pretrained_llm="Qwen/Qwen3-1.7B", prompt_format="qwen", audio_locator_tag="<|audioplaceholder|>",
                lora=dict(r=128, lora_alpha=256, target_modules=["q_proj", "v_proj"]),
                perception=dict(output_dim=2048, preprocessor=pre, encoder=encoder,
                                modality_adapter={"_target_": "IdentityConnector"}))
    llm = dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
               num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000,
               tie_word_embeddings=True, max_position_embeddings=40960, hidden_act="silu")
    return salm, llm


def small_dicts() -> tuple[dict, dict]:
    """The release architecture at CPU scale (full vocabulary: the LM head is part of the per-token cost)."""
    salm, llm = release_dicts()
    salm["perception"]["encoder"].update(n_layers=4, d_model=256, n_heads=4, subsampling_conv_channels=64)
    salm["perception"]["output_dim"] = 256
    salm["lora"].update(r=16, lora_alpha=32)
    llm.update(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64)
    return salm, llm


@torch.no_grad()
def fill_random_(module: torch.nn.Module) -> None:
    """Plausible random values for every float parameter and buffer, in place: unit norm gains, fan-in-scaled
    weights, a Hann window, a positive filterbank, unit BatchNorm variance."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point():
            continue
        if name.endswith("window"):
            t.copy_(torch.hann_window(t.shape[0], periodic=False))
        elif name.endswith(".fb"):
            t.uniform_(0, 0.02)
        elif name.endswith("running_var"):
            t.fill_(1.0)
        elif t.dim() == 1:
            t.fill_(1.0) if "norm" in name and name.endswith("weight") else t.normal_(0, 0.02)
        elif "pos_bias" in name:
            t.normal_(0, 0.1)
        else:
            t.normal_(0, 1 / math.sqrt(t[0].numel()))  # fan-in scaling keeps activations O(1)


@torch.no_grad()
def random_parakeet(encoder: dict | None = None, device="cpu", dtype=torch.float32, seed: int = 0):
    """(net, tokenizer, raw config): Parakeet-TDT in the v2 architecture (tests/fixtures/parakeet-v2-config),
    its encoder settings updated with ``encoder`` (e.g. fewer, narrower layers for a CPU), tdt-tiny's labels and
    tokenizer, random weights; the encoder in ``dtype`` (the decoder stays float32)."""
    import yaml

    from engine.parakeet import NemoArchive, ParakeetTDT, TdtConfig, read_tokenizer

    fixtures = ROOT / "tests" / "fixtures"
    raw = yaml.safe_load((fixtures / "parakeet-v2-config" / "model_config.yaml").read_text())
    if encoder:
        raw["encoder"].update(encoder)
        if "d_model" in encoder:
            raw["joint"]["jointnet"]["encoder_hidden"] = raw["model_defaults"]["enc_hidden"] = encoder["d_model"]
    archive = NemoArchive(fixtures / "tdt-tiny" / "model" / "parakeet.nemo")
    tiny = yaml.safe_load(archive.read("model_config.yaml", "model config"))
    tok = read_tokenizer(archive, tiny)
    archive.close()
    raw["labels"] = tiny["labels"]
    raw["decoder"]["vocab_size"] = raw["joint"]["num_classes"] = len(tiny["labels"])
    cfg = TdtConfig.from_nemo(raw, "random Parakeet-TDT v2 config")
    torch.manual_seed(seed)
    with torch.device(device):
        net = ParakeetTDT(cfg)
    fill_random_(net)
    net.prediction.embed.weight[cfg.blank_id].zero_()  # the padding row, as NeMo's
    net.encoder.to(dtype)
    return net.eval(), tok, raw


@torch.no_grad()
def random_model(salm: dict, llm: dict, dtype=torch.float32, device="cpu", seed: int = 0):
    """(model, tokenizer) with random weights, built directly on ``device`` in ``dtype``."""
    cfg = ModelConfig.from_dicts(salm, llm, "benchmark SALM config", "benchmark Qwen3 config")
    torch.manual_seed(seed)
    with torch.device(device):
        model = CanaryQwenModel(cfg)
    fill_random_(model)
    model = model.to(dtype)
    model.perception.preprocessor.float()  # the frontend always runs in float32
    tok = Tokenizer.from_dir(TOKENIZER_DIR, cfg.audio_locator_tag)
    return model.eval(), tok


def speech_like_durations(n: int, seed: int = 0, low: float = 1.0, high: float = 20.0) -> list[float]:
    """Durations spread like read speech (LibriSpeech-ish: mostly 2-15 s), clipped to [low, high]."""
    g = torch.Generator().manual_seed(seed)
    d = torch.exp(torch.randn(n, generator=g) * 0.6 + math.log(7.0))
    return [float(min(max(x, low), high)) for x in d]


def librispeech_durations(n: int, seed: int = 0) -> list[float]:
    """Log-normal durations clipped to [1, 35] s with a mean of about 7.4 s (LibriSpeech test-clean: 7.4 s per
    utterance on average, shared spec benchmarks.md)."""
    g = torch.Generator().manual_seed(seed)
    mu = math.log(7.4) - 0.6**2 / 2  # the mean of exp(N(mu, 0.6)) is 7.4 s
    d = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 0.6 + mu)
    return [float(min(max(x, 1.0), 35.0)) for x in d]


def tokens_for(duration: float) -> int:
    """Output length of real speech: ~3.7 tokens per second of audio (shared spec, benchmarks.md)."""
    return max(1, round(3.7 * duration))
