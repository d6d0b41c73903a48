"""The NeMo half of ``benchmarks/parakeet_cpu.py --nemo-python``: run with a Python that has NeMo 3.0.

    <nemo python> benchmarks/parakeet_nemo_side.py JOB.json

JOB.json: model_config (a model_config.yaml), tokenizer_dir (tokenizer.model + vocab.txt), weights (a
torch.save'd state dict in NeMo's names), wavs, batch_size, repeats, threads, out. Builds
``EncDecRNNTBPEModel`` from the config, loads the weights strictly, times ``model.transcribe(wavs)`` (after
a warm-up) and writes the times, texts and token ids to ``out``. Imports nothing from this repository.
"""

import json
import sys
import time

import torch


def main() -> int:
    job = json.load(open(sys.argv[1]))
    torch.set_num_threads(int(job["threads"]))
    from nemo.collections.asr.models import EncDecRNNTBPEModel
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(job["model_config"])
    cfg.tokenizer = OmegaConf.create({"dir": job["tokenizer_dir"], "type": "bpe"})
    model = EncDecRNNTBPEModel(cfg=cfg)
    model.load_state_dict(torch.load(job["weights"], weights_only=True, mmap=True), strict=True)
    model.eval()
    wavs, bs = job["wavs"], int(job["batch_size"])
    with torch.no_grad():
        model.transcribe(wavs[:2], batch_size=bs, verbose=False)  # warm-up
        times = []
        for _ in range(int(job["repeats"])):
            t0 = time.perf_counter()
            hyps = model.transcribe(wavs, batch_size=bs, verbose=False)
            times.append(time.perf_counter() - t0)
    import nemo

    json.dump({"seconds": times, "texts": [h.text for h in hyps],
               "token_ids": [[int(t) for t in h.y_sequence] for h in hyps], "nemo": nemo.__version__,
               "torch": torch.__version__}, open(job["out"], "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
