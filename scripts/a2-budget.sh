# Design A′'s declared budget (docs/experiment.md), as `bapo compare` arguments; sourced by
# compare-cpu-a2.sh and compare-gpu.sh (DESIGN=a2) so both run the same experiment.
A2_BUDGET=(--max-train-pairs 16
  --set train.max_steps=8 --set train.warmup_steps=1 --set train.grad_accum=1
  --set train.learning_rate=2e-3
  --set 'eval.knowledge=["../data/knowledge/capitals.jsonl", "../data/knowledge/general_knowledge.jsonl"]'
  --set eval.knowledge_items=0 --set 'eval.formats=["chat"]'
  --set eval.output_prompts=1000 --set eval.output_max_new_tokens=96
  --set output.eval_steps=8 --set output.save_steps=8)
