"""Training and evaluation data: rows from JSONL / Parquet / ``datasets`` directories
(``loader.py``), the MediX prompt (``prompt.py``), images for the VL models (``vision.py``) and
the bundled sample set (``sample/``, written by :mod:`medix_fast.demo.sample_data`)."""
from ..errors import DataError
from .loader import Example, Prompt, PromptLoader, build_prompts, iter_rows, load_examples, resolve_data_path, sample_path

__all__ = ["DataError", "Example", "Prompt", "PromptLoader", "build_prompts", "iter_rows", "load_examples",
           "resolve_data_path", "sample_path"]
