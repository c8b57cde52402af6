"""Independent check of a bapo export with HF transformers (and, with --adapter, PEFT).

Prints one JSON line per input line with TRL-style summed completion log-probs, in the same
layout as `bapo score`, so the two outputs can be compared field by field:

    bapo export --model MODEL.gguf --adapter runs/default/adapter --out /tmp/merged
    bapo score --model /tmp/merged --input PAIRS.jsonl --output /tmp/bapo.jsonl
    python scripts/hf_logps.py /tmp/merged PAIRS.jsonl > /tmp/hf.jsonl
    # or the unmerged adapter on the GGUF base, through PEFT:
    python scripts/hf_logps.py DIR_WITH_GGUF PAIRS.jsonl --gguf-file MODEL.gguf --adapter runs/default/adapter

Rule (as bapo and TRL): prompt = the chat template with the generation prompt; completion =
the completion text's tokens followed by the EOS token; the sum runs over completion tokens.
"""
import argparse, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("pairs")
ap.add_argument("--gguf-file"); ap.add_argument("--adapter")
a = ap.parse_args()
kw = {"gguf_file": a.gguf_file} if a.gguf_file else {}
tok = AutoTokenizer.from_pretrained(a.model, **kw)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw).eval()
if a.adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, a.adapter).eval()
eos = tok.eos_token_id
with torch.no_grad():
    for i, line in enumerate(open(a.pairs), 1):
        e = json.loads(line)
        msgs = e["prompt"] if isinstance(e["prompt"], list) else [{"role": "user", "content": e["prompt"]}]
        p = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        row = {"line": i}
        for k in ("chosen", "rejected", "base"):
            if k not in e:
                continue
            c = tok(e[k], add_special_tokens=False).input_ids + [eos]
            ids = torch.tensor([p + c])
            lp = model(input_ids=ids).logits[0, len(p) - 1:-1].float().log_softmax(-1)
            row[f"logps/{k}"] = float(lp.gather(-1, ids[0, len(p):, None]).sum())
            row[f"tokens_{k}"] = len(c)
        print(json.dumps(row))
