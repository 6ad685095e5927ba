"""Mini-V*: a CPU-sized reproduction of DeepEyes' training dynamics on the real code path.

  tokenizer.py     a small byte-level BPE tokenizer that keeps Qwen2.5-VL's special tokens
  base.py          the tiny Qwen2.5-VL-architecture model and its Hugging Face directory
  tasks.py         the synthetic V*-style items as training records and format-stage trajectories
  format_stage.py  the supervised format stage (the stand-in for Qwen's pretraining)
  run.py           data -> base -> format stage -> GRPO -> evaluation -> figures
"""
