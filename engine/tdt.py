"""Greedy TDT decoding, batched on the device, and NeMo's text and timestamps.

Decoding follows NeMo's ``GreedyBatchedTDTLabelLoopingComputer`` for one utterance (the facts, with sources,
are in tests/fixtures/tdt-tiny/README.md, section 3.6): the blank id is the start symbol; each joint step
takes the argmax label over [vocabulary | blank] and the argmax duration; a blank advances by its duration,
at least one frame; a label is emitted at the current frame, updates the prediction network, and advances by
its duration (0 stays on the frame); after ``max_symbols`` emissions on one frame with duration 0 the frame
advances by one.

A batch runs that state machine for every row at once, one joint step per loop iteration, with each row's
state (frame, prediction output, LSTM state, emissions on the frame) updated under its own mask, so a row's
result does not depend on the others. NeMo's own batched decoder records wrong durations for some rows
(fixture README, "Batch vs single"); this one records each row's own, i.e. NeMo's single-utterance result.
One host copy per step (is any row still active?); on CUDA the step can be replayed from a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .parakeet import ParakeetTDT, SentencePieceText, TdtConfig


@dataclass
class TdtHypothesis:
    """Greedy result of one utterance; ``timesteps[i]`` is the encoder frame token i was emitted at."""

    token_ids: list[int] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    durations: list[int] = field(default_factory=list)  # frames
    duration_indices: list[int] = field(default_factory=list)


class _StepState:
    """Device tensors of a batch in flight (all updated in place, so a CUDA graph can replay the step)."""

    def __init__(self, model: ParakeetTDT, batch: int, frames: int):
        cfg, dev = model.cfg, model.device
        hp, layers = cfg.pred_hidden, cfg.pred_rnn_layers
        self.fp = torch.zeros(batch, frames, cfg.joint_hidden, device=dev)  # projected encoder output
        self.enc_len = torch.zeros(batch, dtype=torch.long, device=dev)
        self.t = torch.zeros(batch, dtype=torch.long, device=dev)
        self.last_t = torch.full((batch,), -1, dtype=torch.long, device=dev)
        self.run = torch.zeros(batch, dtype=torch.long, device=dev)
        self.active = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.h = torch.zeros(layers, batch, hp, device=dev)
        self.c = torch.zeros(layers, batch, hp, device=dev)
        self.gp = torch.zeros(batch, cfg.joint_hidden, device=dev)  # projected prediction output
        self.record = torch.zeros(5, batch, dtype=torch.long, device=dev)  # label, frame, dur, dur idx, emitted
        self.any_active = torch.zeros((), dtype=torch.bool, device=dev)


class GreedyTDT:
    """Batched greedy TDT decoder over a ``ParakeetTDT``: ``decode(enc, enc_lens) -> [TdtHypothesis]``.

    ``cuda_graphs``: on CUDA, capture one step per (batch size, frame capacity) and replay it; eager otherwise.
    """

    def __init__(self, model: ParakeetTDT, cuda_graphs: bool = True):
        self.model, self.cfg = model, model.cfg
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.bucket_rows = self.cuda_graphs  # pad the batch to a power of two rows (bounds the graph count)
        self._durations = torch.tensor(self.cfg.durations, dtype=torch.long, device=model.device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, _StepState]] = {}

    @torch.no_grad()
    def start_state(self, s: _StepState) -> None:
        """Prediction network on the start symbol (the blank id) with a zero LSTM state."""
        m = self.model
        blank = torch.full_like(s.t, self.cfg.blank_id)
        s.h.zero_()
        s.c.zero_()
        g, h, c = m.prediction(blank, s.h, s.c)
        s.h.copy_(h)
        s.c.copy_(c)
        s.gp.copy_(m.joint.pred(g))
        s.t.zero_()
        s.last_t.fill_(-1)
        s.run.zero_()
        s.active.copy_(s.enc_len > 0)

    @torch.no_grad()
    def step(self, s: _StepState) -> None:
        """One joint evaluation for every row; inactive rows compute but change nothing."""
        m, cfg = self.model, self.cfg
        v = cfg.vocab_size
        frame = torch.minimum(s.t, (s.enc_len - 1).clamp(min=0))  # [B]: rows past their end read a valid frame
        f = s.fp.gather(1, frame[:, None, None].expand(-1, 1, s.fp.shape[2]))[:, 0]  # [B, J]
        z = m.joint(f, s.gp)  # [B, V+1+D] raw logits (log-softmax would not change either argmax)
        label = z[:, : v + 1].argmax(-1)
        dur_idx = z[:, v + 1 :].argmax(-1)
        dur = self._durations[dur_idx]
        blank = label == cfg.blank_id
        dur = torch.where(blank & (dur == 0), torch.ones_like(dur), dur)  # a blank never stays on its frame
        emit = s.active & ~blank
        # Prediction network for every row; only emitting rows keep the new state (blanks never update it).
        g, h, c = m.prediction(label, s.h, s.c)
        gp = m.joint.pred(g)
        s.h.copy_(torch.where(emit[None, :, None], h, s.h))
        s.c.copy_(torch.where(emit[None, :, None], c, s.c))
        s.gp.copy_(torch.where(emit[:, None], gp, s.gp))
        run = torch.where(s.t == s.last_t, s.run + 1, torch.ones_like(s.run))
        s.run.copy_(torch.where(emit, run, s.run))
        forced = emit & (s.run >= cfg.max_symbols) & (dur == 0)  # max_symbols on this frame: move on
        s.record.copy_(torch.stack((label, s.t, dur, dur_idx, emit.long())))
        s.last_t.copy_(torch.where(emit, s.t, s.last_t))
        s.t.copy_(torch.where(s.active, s.t + dur + forced.long(), s.t))
        s.active.copy_(s.t < s.enc_len)
        s.any_active.copy_(s.active.any())

    def _state(self, batch: int, frames: int) -> tuple[_StepState, "torch.cuda.CUDAGraph | None"]:
        if not self.cuda_graphs:
            return _StepState(self.model, batch, frames), None
        cap = 1 << max(frames - 1, 0).bit_length()  # frame capacity: powers of two bound the graph count
        key = (batch, cap)
        if key not in self._graphs:
            s = _StepState(self.model, batch, cap)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (cuBLAS workspaces) before capture, as PyTorch advises
                for _ in range(2):
                    self.step(s)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(s)
            self._graphs[key] = (graph, s)
        return self._graphs[key][1], self._graphs[key][0]

    @torch.no_grad()
    def decode(self, enc: torch.Tensor, enc_lens: torch.Tensor, projected: bool = False) -> list[TdtHypothesis]:
        """enc [B, T, D] (any padding beyond enc_lens) + enc_lens [B] -> one hypothesis per row.

        ``projected``: ``enc`` is already ``joint.enc(encoder output)`` [B, T, joint_hidden], as the exported
        encoder graphs (engine/export/tdt_onnx.py) give it."""
        b, t, _ = enc.shape
        if b == 0:
            return []
        if self.bucket_rows:  # rows padded to a power of two (length 0: never active) bound the graph count
            rows = 1 << (b - 1).bit_length()
            enc = torch.cat((enc, enc.new_zeros(rows - b, t, enc.shape[2])))
            enc_lens = torch.cat((enc_lens, enc_lens.new_zeros(rows - b)))
        s, graph = self._state(enc.shape[0], t)
        s.fp.zero_()
        enc = enc.to(s.fp.device, torch.float32)
        s.fp[:, :t].copy_(enc if projected else self.model.joint.enc(enc))  # projected once per utterance
        s.enc_len.copy_(enc_lens.to(s.enc_len.device))
        self.start_state(s)
        records = []
        active = bool(s.active.any())
        while active:
            if graph is not None:
                graph.replay()
            else:
                self.step(s)
            records.append(s.record.clone())
            active = bool(s.any_active)  # the step's one host copy
        return self._collect(records, enc.shape[0])[:b]

    @staticmethod
    def _collect(records: list[torch.Tensor], batch: int) -> list[TdtHypothesis]:
        hyps = [TdtHypothesis() for _ in range(batch)]
        if not records:
            return hyps
        rec = torch.stack(records).cpu()  # [S, 5, B]
        for i in range(batch):
            r = rec[:, :, i]
            r = r[r[:, 4] == 1]  # emitted steps, in order
            hyps[i] = TdtHypothesis(r[:, 0].tolist(), r[:, 1].tolist(), r[:, 2].tolist(), r[:, 3].tolist())
        return hyps


# ---- text and timestamps ---------------------------------------------------------------------------------


def token_offsets(hyp: TdtHypothesis, tok: SentencePieceText) -> list[dict]:
    """Per token: NeMo's TDT char offsets, ``start_offset = timestep``, ``end_offset = timestep + duration``;
    then a punctuation token starts and ends where the previous token ends (``_refine_timestamps_tdt``)."""
    out = []
    for i, (tid, s, d) in enumerate(zip(hyp.token_ids, hyp.timesteps, hyp.durations)):
        text = tok.decode_raw([tid])
        o = {"token_id": tid, "piece": tok.pieces[tid], "text": text, "start_offset": s, "end_offset": s + d}
        if i > 0 and tok.punctuation and text in tok.punctuation:
            o["start_offset"] = o["end_offset"] = out[-1]["end_offset"]
        out.append(o)
    return out


def word_offsets(tokens: list[dict], tok: SentencePieceText, delimiter: str = " ") -> list[dict]:
    """Words from token offsets, as NeMo's ``get_words_offsets`` for BPE: a token whose piece differs from its
    text (a word-start ``▁``) begins a word; a punctuation token joins the word before it."""
    punct = tok.punctuation
    words: list[dict] = []
    built: list[str] = []  # pieces of the word being built
    first = 0  # index of its first token

    def word(pieces, start, end):
        return {"word": tok.sp.decode_pieces(pieces), "start_offset": start, "end_offset": end}

    for i, o in enumerate(tokens):
        text, piece = o["text"], o["piece"]
        is_punct = bool(punct) and text in punct and text != delimiter
        nxt = None  # next token text that is not the delimiter
        j = i
        while not nxt and j < len(tokens) - 1:
            j += 1
            nxt = tokens[j]["text"] if tokens[j]["text"] != delimiter else None
        starts = piece != text or (text == delimiter and nxt not in punct)
        if starts and not is_punct:
            if built:
                words.append(word(built, tokens[first]["start_offset"], tokens[i - 1]["end_offset"]))
            built = []
            if text != delimiter:
                built, first = [piece], i
        elif is_punct and not built and words:
            w = words[-1]
            w["end_offset"] = o["end_offset"]
            if w["word"].endswith(" "):
                w["word"] = w["word"][:-1]
            w["word"] += text
        elif is_punct and built:
            if built[-1] in (" ", "_", "\u2581"):
                built = built[:-1]
            built.append(piece)
        else:
            if not built:
                first = i
            built.append(piece)
    if not words:
        if built:
            words.append(word(built, tokens[0]["start_offset"], tokens[-1]["end_offset"]))
    else:
        words[0]["start_offset"] = tokens[0]["start_offset"]
        if built:
            words.append(word(built, tokens[first]["start_offset"], tokens[-1]["end_offset"]))
    return words


def segment_offsets(words: list[dict], separators: tuple[str, ...] = (".", "!", "?")) -> list[dict]:
    """Segments from words, as NeMo's ``get_segment_offsets`` without a gap threshold: words are joined by
    spaces until one ends with (or is) a separator."""
    segments, current, first = [], [], 0
    for i, w in enumerate(words):
        current.append(w["word"])
        if w["word"] and (w["word"][-1] in separators or w["word"] in separators):
            segments.append({"segment": " ".join(current), "start_offset": words[first]["start_offset"],
                             "end_offset": w["end_offset"]})
            current, first = [], i + 1
    if current:
        segments.append({"segment": " ".join(current), "start_offset": words[first]["start_offset"],
                         "end_offset": words[-1]["end_offset"]})
    return segments


def add_seconds(items: list[dict], cfg: TdtConfig) -> list[dict]:
    """``start``/``end`` in seconds: offset x window_stride x subsampling_factor, NeMo's expression order."""
    for o in items:
        o["start"] = o["start_offset"] * cfg.window_stride * cfg.encoder.subsampling_factor
        o["end"] = o["end_offset"] * cfg.window_stride * cfg.encoder.subsampling_factor
    return items


@dataclass
class TdtResult:
    """Text and timestamps of one utterance, as NeMo's ``transcribe(timestamps=True)`` gives them."""

    text: str
    hypothesis: TdtHypothesis
    tokens: list[dict]  # token_id, piece, text, start_offset, end_offset, start, end
    words: list[dict]  # word, start_offset, end_offset, start, end (seconds)
    segments: list[dict]  # segment, start_offset, end_offset, start, end


def finalize(hyp: TdtHypothesis, tok: SentencePieceText, cfg: TdtConfig) -> TdtResult:
    tokens = token_offsets(hyp, tok)
    words = word_offsets(tokens, tok)
    segments = segment_offsets(words)
    return TdtResult(tok.decode(hyp.token_ids), hyp, add_seconds(tokens, cfg), add_seconds(words, cfg),
                     add_seconds(segments, cfg))
