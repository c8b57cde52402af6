"""Writes the committed fuzz seeds in fuzz/seeds/ with independent writers: llama.cpp's gguf-py
for GGUF and HF's safetensors package for safetensors. Run from the repo root with a Python that
has gguf, safetensors and numpy (the README's peer venv):  python fuzz/make_seeds.py
"""
import json
import pathlib

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

root = pathlib.Path(__file__).parent / "seeds"
rng = np.random.default_rng(0)


def tiny_llama(path, arch="llama", tokenizer=True, quant=True):
    hidden, heads, kv, ffn, vocab = 32, 4, 2, 32, 40
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if tokenizer:
        tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list("abcdefghHiĠtr ,0123456789") + ["Hi", "Ġt", "Ġth", "er", "re", "ün", "ï", "co", "de", "Ġa"]
        tokens = tokens[:vocab] + [f"x{i}" for i in range(vocab - len(tokens))]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
        w.add_token_merges(["H i", "Ġ t", "Ġt h", "e r", "r e"])
        w.add_eos_token_id(2)
        w.add_bos_token_id(1)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    else:
        w.add_vocab_size(vocab)

    def add(name, shape, ty):
        data = rng.standard_normal(shape).astype(np.float32)
        if ty in (Q.F32,):
            w.add_tensor(name, data)
        elif ty == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data, ty)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=ty)

    types = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.BF16, Q.F16] if quant else [Q.F32] * 5
    add("token_embd.weight", (vocab, hidden), types[4])
    add("output_norm.weight", (hidden,), Q.F32)
    add("blk.0.attn_norm.weight", (hidden,), Q.F32)
    add("blk.0.ffn_norm.weight", (hidden,), Q.F32)
    add("blk.0.attn_q.weight", (hidden, hidden), types[0])
    add("blk.0.attn_k.weight", (kv * 8, hidden), types[1])
    add("blk.0.attn_v.weight", (kv * 8, hidden), types[2])
    add("blk.0.attn_output.weight", (hidden, hidden), types[3])
    add("blk.0.ffn_gate.weight", (ffn, hidden), types[0])
    add("blk.0.ffn_up.weight", (ffn, hidden), types[1])
    add("blk.0.ffn_down.weight", (hidden, ffn), types[2])
    if arch == "qwen2":
        add("blk.0.attn_q.bias", (hidden,), Q.F32)
        add("blk.0.attn_k.bias", (kv * 8,), Q.F32)
        add("blk.0.attn_v.bias", (kv * 8,), Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


tiny_llama(root / "gguf" / "tiny-llama-quantised.gguf")
tiny_llama(root / "gguf" / "tiny-llama-f32-no-tokenizer.gguf", tokenizer=False, quant=False)
tiny_llama(root / "gguf" / "tiny-qwen2.gguf", arch="qwen2")

st = root / "safetensors"
save_file({"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(6, dtype=np.float16).reshape(2, 3)},
          str(st / "f32-f16.safetensors"), metadata={"format": "pt"})
save_file({"model.norm.weight": np.ones(8, dtype=np.float32), "scalar": np.array(2.5, dtype=np.float32)},
          str(st / "scalar.safetensors"))
# BF16 by hand (numpy has no bfloat16): the top 16 bits of f32.
bf = (np.linspace(-2, 2, 8, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, len(bf)]}}).encode()
header += b" " * (-len(header) % 8)
(st / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bf)

jl = root / "jsonl"
(jl / "standard.jsonl").write_text(
    '{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Five, probably.", "user": "concise"}\n'
    '\n'
    '{"prompt": "Name a colour", "chosen": "Blue", "rejected": "Hmm", "base": "Red is a colour."}\r\n')
(jl / "conversational.jsonl").write_text(json.dumps({
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}],
    "chosen": [{"role": "assistant", "content": "Paris."}],
    "rejected": [{"role": "assistant", "content": "I think it might be Lyon."}],
    "persona": "child"}) + "\n")
(jl / "unicode.jsonl").write_text('{"prompt":"Ünïcödé \\u00e9 \\ud83d\\ude00 {{ x }} {% if %}","chosen":"ok","rejected":"no\\n\\tthanks"}\n', encoding="utf-8")
