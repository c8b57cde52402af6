"""A random-weight GGUF of a real model's shape in a llama.cpp quantisation mix, for memory and
speed measurements of `model.base_dtype = "gguf"` at the sizes users personalise (no download).

    ~/.cache/bapo/fx-venv/bin/python scripts/shape_gguf.py llama3.2-1b OUT.gguf --mix q4_k_m

Shapes are scripts/shape_checkpoint.py's (the models' config.json values). Mixes:
- `q4_k_m`: llama.cpp's Q4_K_M on these models: Q4_K matrices, Q6_K for the embedding (the tied
  head) and for `attn_v`/`ffn_down` of the layers `use_more_bits` picks.
- `q8_0`: every matrix Q8_0.
- `q4_0`: Q4_0 matrices, Q8_0 embedding (what llama.cpp writes for a Q4_0 file).
Blocks are random valid blocks (tests/fixtures/make_kquants.py's `random_quantised`: gguf-py
cannot quantise K-quants), values of standard deviation 0.02 like the safetensors shapes.
The tokenizer is SmolLM2's (tests/fixtures/smollm2), padded with unused tokens to the shape's
vocabulary, with its chat template.
"""
import argparse, json, os, sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
sys.path.insert(0, HERE)
from make_kquants import random_quantised  # noqa: E402
from shape_checkpoint import SHAPES  # noqa: E402


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def qtype(mix, part, i, n):
    if mix == "q8_0":
        return T.Q8_0
    if mix == "q4_0":
        return T.Q8_0 if part == "token_embd" else T.Q4_0
    if part == "token_embd" or (part in ("attn_v", "ffn_down") and use_more_bits(i, n)):
        return T.Q6_K
    return T.Q4_K


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--mix", choices=["q4_k_m", "q8_0", "q4_0"], default="q4_k_m")
    a = ap.parse_args()
    c = SHAPES[a.shape]
    arch = "qwen3" if c["model_type"] == "qwen3" else "llama"
    h, hd, nh, nkv = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    inter, n, vocab = c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    smol = os.path.join(HERE, "..", "tests", "fixtures", "smollm2")
    tj = json.load(open(os.path.join(smol, "tokenizer.json")))
    tokens = [None] * len(tj["model"]["vocab"])
    for t, i in tj["model"]["vocab"].items():
        tokens[i] = t
    types = [1] * len(tokens)
    for t in tj["added_tokens"]:
        types[t["id"]] = 3
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    tokens += [f"<|unused_{i}|>" for i in range(vocab - len(tokens))]
    types += [5] * (vocab - len(types))
    template = open(os.path.join(smol, "chat_template.jinja")).read()

    rng = np.random.default_rng(45)
    w = gguf.GGUFWriter(a.out, arch)
    w.add_name(f"{a.shape}-shape-{a.mix}")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(n)
    w.add_feed_forward_length(inter)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(template)

    def matrix(name, shape, part, i=0):
        blocks = random_quantised(rng, shape, qtype(a.mix, part, i, n), 0.02)
        w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype(a.mix, part, i, n))

    def ones(name, k):
        w.add_tensor(name, np.ones(k, dtype=np.float32))

    matrix("token_embd.weight", (vocab, h), "token_embd")
    ones("output_norm.weight", h)
    for i in range(n):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", h)
        ones(p + "ffn_norm.weight", h)
        if arch == "qwen3":
            ones(p + "attn_q_norm.weight", hd)
            ones(p + "attn_k_norm.weight", hd)
        for part, shape in [("attn_q", (nh * hd, h)), ("attn_k", (nkv * hd, h)), ("attn_v", (nkv * hd, h)),
                            ("attn_output", (h, nh * hd)), ("ffn_gate", (inter, h)), ("ffn_up", (inter, h)),
                            ("ffn_down", (h, inter))]:
            matrix(p + part + ".weight", shape, part, i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{a.shape} {a.mix}: {os.path.getsize(a.out) / 1e9:.3f} GB -> {a.out}")


if __name__ == "__main__":
    main()
