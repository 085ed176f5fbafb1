"""Configs, installed as ``medix_fast.configs``; every file of this folder is listed here
(tests/test_layout.py checks the list against the files).

Training (``python -m medix_fast.train --config FILE``):
tiny.yaml                 the default: embedded tiny model + bundled sample data, 2 CPU cores, < 5 min
tiny_vl.yaml              the same with images: embedded tiny Qwen2.5-VL + bundled synthetic images
tiny_vl_moe.yaml          the same on an embedded random Qwen3-VL-MoE: the MoE path end to end
medix_r1_2b_dapo.yaml     MediX-R1 2B (Qwen3-VL-2B-Instruct), DAPO
medix_r1_8b_dapo.yaml     MediX-R1 8B (Qwen3-VL-8B-Instruct), DAPO
medix_r1_8b_grpo.yaml     MediX-R1 8B, GRPO with the k3 KL to the reference model
medix_r1_7b_gspo.yaml     MediX-R1 7B (Qwen2.5-VL-7B-Instruct), GSPO-token
medix_r1_30b_a3b_dapo.yaml  MediX-R1 30B (Qwen3-VL-30B-A3B, mixture of experts), DAPO

Evaluation (``python -m medix_fast.eval --protocol medix_r1 --tasks FILE``):
eval/medix_r1.yaml        MediX-R1's published evaluation: its 17 benchmarks, from local copies
eval/medix_r1_sample.yaml the bundled held-out set through the same protocol, for a quick run
"""
