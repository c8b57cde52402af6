"""A random-weight HF checkpoint of a real model's shape, for memory and speed measurements at the
sizes users personalise (no download: the shapes are the models' config.json values, as in
../shared/peer/torch_bapo_step.py).

    python3 scripts/shape_checkpoint.py llama3.2-1b OUT_DIR [--dtype bf16|f32]

Writes OUT_DIR/config.json, model.safetensors (weights ~N(0, 0.02), norms 1) and the SmolLM2
tokenizer files from tests/fixtures/smollm2 (49,152 tokens: fewer than the shape's vocabulary, so
every id it makes has an embedding row).
"""
import argparse, json, os, shutil

import torch
from safetensors.torch import save_file

SHAPES = {
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=40960,
                       rms_norm_eps=1e-6),
    "llama3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, rope_theta=5e5, tie_word_embeddings=True, max_position_embeddings=131072,
                        rms_norm_eps=1e-5,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen3-1.7b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=2048,
                       intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=40960,
                       rms_norm_eps=1e-6),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    a = ap.parse_args()
    c = SHAPES[a.shape]
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    h, hd, nh, nkv, inter = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dt)

    t = {"model.embed_tokens.weight": w(c["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=dt)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        t[p + "mlp.gate_proj.weight"] = w(inter, h)
        t[p + "mlp.up_proj.weight"] = w(inter, h)
        t[p + "mlp.down_proj.weight"] = w(h, inter)
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=dt)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dt)
        if c["model_type"] == "qwen3":
            t[p + "self_attn.q_norm.weight"] = torch.ones(hd, dtype=dt)
            t[p + "self_attn.k_norm.weight"] = torch.ones(hd, dtype=dt)
    os.makedirs(a.out, exist_ok=True)
    cfg = dict(c, torch_dtype="bfloat16" if a.dtype == "bf16" else "float32", hidden_act="silu",
               bos_token_id=1, eos_token_id=2, attention_bias=False)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_file(t, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    smol = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "smollm2")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(smol, name), os.path.join(a.out, name))
    n = sum(x.numel() for x in t.values())
    print(f"{a.shape}: {n / 1e9:.3f} B parameters in {a.dtype} -> {a.out}")


if __name__ == "__main__":
    main()
