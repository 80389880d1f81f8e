"""Converts a llama2.c checkpoint (and its tokenizer) into a Hugging Face Llama model directory.

    python -m kvtrim.llama2c stories260K.bin tok512.bin out/stories260K-hf

The result loads with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` and computes what llama2.c
computes. Formats (as examples/llama2 reads them):
  checkpoint  7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
              negative vocab_size means an unshared classifier), then float32 tensors: token_embedding, rms_att,
              wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis real and imaginary (unused), [wcls].
  tokenizer   int32 max_token_length, then per token: float32 score, int32 length, bytes.

RoPE: llama2.c rotates the pairs (2i, 2i+1) of each head; Hugging Face's Llama rotates (i, i + head_dim/2). The
two agree when the rows of wq and wk are reordered inside every head so that the even rows come first, then the
odd ones: HF row j < head_dim/2 is llama2.c row 2j, HF row head_dim/2 + j is llama2.c row 2j + 1. Attention
scores are dot products over a head, so they are unchanged by this reordering; values and outputs are untouched.

The tokenizer becomes a `tokenizers` BPE: llama2.c merges the adjacent pair whose concatenation is the
vocabulary entry with the highest score, so every split (a, b) of a vocabulary entry into two entries is a merge,
ranked by the entry's score; a leading space is prepended (sentencepiece's dummy prefix), characters outside the
vocabulary fall back to their bytes (<0x00>..<0xFF>, ids 3..258).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from dataclasses import dataclass

import numpy as np


@dataclass
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size


def read_checkpoint(path: str) -> tuple[Llama2cConfig, dict[str, np.ndarray]]:
    """The checkpoint's header and tensors (float32, row-major [out, in] as llama2.c stores them)."""
    with open(path, "rb") as f:
        header = f.read(28)
        if len(header) != 28:
            raise ValueError(f"{path}: shorter than the 28-byte llama2.c header")
        dim, hidden, L, H, Hkv, vocab, seq = struct.unpack("<7i", header)
        data = np.frombuffer(f.read(), dtype="<f4")
    c = Llama2cConfig(dim, hidden, L, H, Hkv, abs(vocab), seq, vocab > 0)
    if min(dim, hidden, L, H, Hkv, c.vocab_size, seq) <= 0 or dim % H or H % Hkv or c.head_size % 2:
        raise ValueError(f"{path}: header {dim, hidden, L, H, Hkv, vocab, seq} is not a llama2.c model")
    hs, kv = c.head_size, c.kv_dim
    shapes = [("embedding", (c.vocab_size, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)),
              ("wk", (L, kv, dim)), ("wv", (L, kv, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)),
              ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
              ("freq_cis", (seq, hs))]
    if not c.shared_classifier:
        shapes.append(("wcls", (c.vocab_size, dim)))
    want = sum(int(np.prod(s)) for _, s in shapes)
    if data.size != want:
        raise ValueError(f"{path}: {data.size} floats after the header; its header implies {want}")
    out, at = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = data[at:at + n].reshape(shape).astype(np.float32)
        at += n
    return c, out


def rope_rows_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorders the rows of a [n_heads*head_size, in] projection from llama2.c's pair order to HF's halves."""
    rows, cols = w.shape
    hs = rows // n_heads
    return w.reshape(n_heads, hs // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def read_tokenizer(path: str, vocab_size: int) -> tuple[list[bytes], list[float]]:
    with open(path, "rb") as f:
        blob = f.read()
    at, pieces, scores = 4, [], []
    for i in range(vocab_size):
        if at + 8 > len(blob):
            raise ValueError(f"{path}: truncated at token {i} of {vocab_size}")
        score, n = struct.unpack_from("<fi", blob, at)
        at += 8
        pieces.append(blob[at:at + n])
        scores.append(score)
        at += n
    if at != len(blob):
        raise ValueError(f"{path}: {len(blob) - at} bytes left after {vocab_size} tokens (another model's tokenizer?)")
    return pieces, scores


def build_tokenizer(pieces: list[bytes], scores: list[float]):
    """A `tokenizers.Tokenizer` (BPE with byte fallback) equal to llama2.c's encoder on the same vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    special = {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab: dict[str, int] = {}
    for i, p in enumerate(pieces):
        text = special.get(i) or p.decode("utf-8", errors="replace")
        if 3 <= i <= 258:
            text = f"<0x{i - 3:02X}>"
        vocab.setdefault(text, i)  # the lowest id wins on duplicates, as in llama2.c's lookup
    merges = []
    for text, i in vocab.items():
        if i < 259 or len(text) < 2:
            continue
        for cut in range(1, len(text)):
            a, b = text[:cut], text[cut:]
            if vocab.get(a, 0) >= 3 and vocab.get(b, 0) >= 3:  # no merges into <unk>, <s>, </s>
                merges.append((scores[i], i, a, b))
    merges.sort(key=lambda m: (-m[0], m[1]))
    bpe = models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in merges], unk_token="<unk>", byte_fallback=True,
                     fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Prepend(" ")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tok


def convert(checkpoint: str, tokenizer: str | None, out_dir: str) -> str:
    """Writes config.json, model.safetensors (and the tokenizer files) into out_dir; returns out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    c, w = read_checkpoint(checkpoint)
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_size,
        max_position_embeddings=c.seq_len, rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False,
        mlp_bias=False, tie_word_embeddings=c.shared_classifier, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32")
    state = {"model.embed_tokens.weight": w["embedding"], "model.norm.weight": w["rms_final"],
             "lm_head.weight": w["embedding"] if c.shared_classifier else w["wcls"]}
    for l in range(c.n_layers):
        p = f"model.layers.{l}."
        state[p + "input_layernorm.weight"] = w["rms_att"][l]
        state[p + "post_attention_layernorm.weight"] = w["rms_ffn"][l]
        state[p + "self_attn.q_proj.weight"] = rope_rows_to_hf(w["wq"][l], c.n_heads)
        state[p + "self_attn.k_proj.weight"] = rope_rows_to_hf(w["wk"][l], c.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = w["wv"][l]
        state[p + "self_attn.o_proj.weight"] = w["wo"][l]
        state[p + "mlp.gate_proj.weight"] = w["w1"][l]
        state[p + "mlp.down_proj.weight"] = w["w2"][l]
        state[p + "mlp.up_proj.weight"] = w["w3"][l]
    model = LlamaForCausalLM(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (c.shared_classifier and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"conversion left weights unset {missing} or unused {unexpected}")
    if c.shared_classifier:
        model.tie_weights()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer:
        pieces, scores = read_tokenizer(tokenizer, c.vocab_size)
        fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(pieces, scores), bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>", model_max_length=c.seq_len)
        fast.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "kvtrim_llama2c.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint), "tokenizer": tokenizer and os.path.abspath(tokenizer),
                   "rope": "rows of wq and wk reordered per head: even rows, then odd rows"}, f, indent=1)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvtrim.llama2c", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="llama2.c float32 checkpoint, e.g. stories260K.bin")
    ap.add_argument("tokenizer", nargs="?", help="its llama2.c tokenizer, e.g. tok512.bin (optional)")
    ap.add_argument("out_dir", help="Hugging Face model directory to write")
    args = ap.parse_args(argv)
    print(convert(args.checkpoint, args.tokenizer, args.out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
