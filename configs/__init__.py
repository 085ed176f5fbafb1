"""Training configs, installed as ``medix_fast.configs`` (``python -m medix_fast.train --config FILE``).

tiny.yaml               the default: embedded tiny model + bundled sample data, 2 CPU cores, < 5 min
tiny_vl.yaml            the same with images: embedded tiny Qwen2.5-VL + bundled synthetic images
medix_r1_2b_dapo.yaml   MediX-R1 2B (Qwen3-VL-2B-Instruct), DAPO
medix_r1_8b_dapo.yaml   MediX-R1 8B (Qwen3-VL-8B-Instruct), DAPO
medix_r1_8b_grpo.yaml   MediX-R1 8B, GRPO with the k3 KL to the reference model
medix_r1_7b_gspo.yaml   MediX-R1 7B (Qwen2.5-VL-7B-Instruct), GSPO-token
"""
