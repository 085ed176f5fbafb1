"""Training checkpoints (medix_fast/checkpoint.py) and the export (medix_fast/export.py).

One process: the async save writes a snapshot (the staging copy), a failed write leaves the previous
checkpoint, pruning keeps this run's newest and every HF copy, bad directories are one-line errors,
RNG streams are restored or re-derived (their files keep every field), a pickle in a checkpoint
naming code is refused before it runs (an older format's .pt files still load), VL exports carry
the image processor, an MoE exports in its Hub layout. Two gloo processes (tests/ckpt_worker.py's
jobs, FSDP2): a checkpoint written by 2 ranks resumes at 2 ranks (the same step-3 metrics as the
uninterrupted run, each shard's checksum verified by one rank) and at 1 (the same weights and
optimizer state, FSDP or not; a damaged second shard is refused), and exports to a Hugging Face
directory with the same weights.
"""
from __future__ import annotations

import gc
import json
import pickle
import random
import shutil
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_worker import comparable, config, full_state

from medix_fast.config import load_config
from medix_fast import checkpoint as C
from medix_fast import distributed as D
from medix_fast.checkpoint_files import read_rng, write_rng
from medix_fast.export import export, load_checkpoint_model, main as export_main, save_hf_model, write_hf_files
from medix_fast.demo.cache import resolve_model_path
from medix_fast.model.loading import load_image_processor, load_model
from medix_fast.train import Trainer, main as train_main


def trained(name: str = "tiny"):
    """A tiny model and an AdamW that has taken one step (so it has moments)."""
    model, tokenizer = load_model(resolve_model_path(name))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad()
    return model, tokenizer, optimizer


def save(ckpt: C.Checkpointer, model, tokenizer, optimizer, step: int, hf: bool = False, processor=None) -> Path:
    def extra(directory: Path) -> None:
        write_hf_files(directory / C.HF_CONFIG, model, tokenizer, processor)
        if hf:
            save_hf_model(directory / C.HF_MODEL, model, None, tokenizer, processor)

    trainer_state = {"scheduler": {}, "loader": {}, "nonfinite_in_a_row": 0}
    return ckpt.save(step, D.training_state(model, model, optimizer), trainer_state, extra)


def saved_model(path: Path) -> dict:
    model = load_model(resolve_model_path("tiny"))[0]
    state = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
    C.load_state(path, state)
    return state["model"]


@pytest.fixture(scope="module")
def tiny():
    return trained()


@pytest.mark.parametrize("keep_staging", [True, False])
def test_async_save_writes_the_state_of_the_step_not_later_updates(tmp_path, tiny, monkeypatch, keep_staging):
    model, tokenizer, optimizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    release = threading.Event()
    write = torch.distributed.checkpoint.FileSystemWriter.write_data

    def held_write(self, plan, planner):
        release.wait(60)  # the write starts only after the training below changed the weights
        return write(self, plan, planner)

    monkeypatch.setattr(torch.distributed.checkpoint.FileSystemWriter, "write_data", held_write)
    ckpt = C.Checkpointer(tmp_path, 0, 1, "run", async_save=True, keep_staging=keep_staging)
    path = save(ckpt, model, tokenizer, optimizer, 1)
    assert C.latest_checkpoint(tmp_path) is None  # not visible while being written
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ckpt.poll()  # after every step: publishes a finished write, never waits for one
    assert C.latest_checkpoint(tmp_path) is None
    release.set()
    ckpt.poll()
    ckpt.wait()
    assert C.latest_checkpoint(tmp_path) == path
    for key, value in saved_model(path).items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1.0)


@pytest.mark.parametrize("keep_staging", [True, False])
def test_the_staging_copy_is_kept_between_saves_only_with_keep_staging(tmp_path, tiny, monkeypatch, keep_staging):
    """keep_staging: the second save refills the first save's host buffers; without it each save
    stages into a fresh copy that is freed once written."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.staging import DefaultStager

    model, tokenizer, optimizer = tiny
    staged: list[dict] = []
    for cls in (DefaultStager, FileSystemWriter):  # the kept buffers' stager, the writer's own (per save)
        def stage(self, state_dict, *args, _stage=cls.stage, **kwargs):
            out = _stage(self, state_dict, *args, **kwargs)
            staged.append(out["model"])
            return out

        monkeypatch.setattr(cls, "stage", stage)
    ckpt = C.Checkpointer(tmp_path, 0, 1, "run", async_save=True, keep_staging=keep_staging)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save(ckpt, model, tokenizer, optimizer, 1)
    ckpt.wait()
    first = staged.pop()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save(ckpt, model, tokenizer, optimizer, 2)
    second = [weakref.ref(t) for t in staged.pop().values()]
    ckpt.wait()
    gc.collect()
    now = {k: v.clone() for k, v in model.state_dict().items()}
    for key, value in first.items():  # refilled in place, or still the first save's own copy
        assert torch.equal(value, now[key] if keep_staging else before[key]), key
    if not keep_staging:
        assert second and all(ref() is None for ref in second)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1.0)
    for key, value in saved_model(C.checkpoint_root(tmp_path) / "step_00000002").items():
        assert torch.equal(value, now[key]), key


def test_a_new_checkpointer_in_the_process_waits_for_the_save_in_flight(tmp_path, tiny, monkeypatch):
    """A resume (or a new run) in the same process finds the save in flight complete, not removed
    as a stale temporary directory."""
    model, tokenizer, optimizer = tiny
    release = threading.Event()
    write = torch.distributed.checkpoint.FileSystemWriter.write_data
    monkeypatch.setattr(torch.distributed.checkpoint.FileSystemWriter, "write_data",
                        lambda self, plan, planner: release.wait(60) and write(self, plan, planner))
    path = save(C.Checkpointer(tmp_path, 0, 1, "run", async_save=True), model, tokenizer, optimizer, 1)
    threading.Timer(0.5, release.set).start()
    C.Checkpointer(tmp_path, 0, 1, "run")
    assert release.is_set() and C.latest_checkpoint(tmp_path) == path
    C.check_checkpoint(path)


KILLED_MID_WRITE = """
import os, signal, sys, torch
from pathlib import Path
import torch.distributed.checkpoint as dcp
from test_checkpoint import C, save, trained

model, tokenizer, optimizer = trained()
ckpt = C.Checkpointer(sys.argv[1], 0, 1, "run", async_save=True)
save(ckpt, model, tokenizer, optimizer, 1)
ckpt.wait()
write = dcp.FileSystemWriter.write_data

def killed(self, plan, planner):  # part of the shards on disk, then SIGKILL
    write(self, plan, planner).wait()
    (Path(self.path) / "__0_0.distcp").write_bytes(b"partial")
    os.kill(os.getpid(), signal.SIGKILL)

dcp.FileSystemWriter.write_data = killed
save(ckpt, model, tokenizer, optimizer, 2)
ckpt.wait()
"""


def test_a_run_killed_mid_write_resumes_from_its_last_complete_checkpoint(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path)], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = C.checkpoint_root(tmp_path)
    assert (root / ".tmp_step_00000002" / C.STATE / "__0_0.distcp").read_bytes() == b"partial"
    assert C.latest_checkpoint(tmp_path) == root / "step_00000001"
    C.check_checkpoint(root / "step_00000001")
    C.Checkpointer(tmp_path, 0, 1, "run")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    model, _, optimizer = trained()
    for key, value in saved_model(root / "step_00000001").items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_a_new_save_first_publishes_the_pending_one(tmp_path, tiny):
    model, tokenizer, optimizer = tiny
    ckpt = C.Checkpointer(tmp_path, 0, 1, "run", keep_last=0, async_save=True)
    paths = [save(ckpt, model, tokenizer, optimizer, step) for step in (1, 2, 3)]
    assert C.list_checkpoints(tmp_path) == paths[:2]  # the third: published by wait() or poll()
    ckpt.wait()
    assert C.list_checkpoints(tmp_path) == paths


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, tiny, monkeypatch):
    model, tokenizer, optimizer = tiny
    ckpt = C.Checkpointer(tmp_path, 0, 1, "run", async_save=True)
    first = save(ckpt, model, tokenizer, optimizer, 1)
    ckpt.wait()

    def disk_full(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.distributed.checkpoint.FileSystemWriter, "write_data", disk_full)
    save(ckpt, model, tokenizer, optimizer, 2)
    needed = C.state_bytes(D.training_state(model, model, optimizer)) / 1e6
    with pytest.raises(C.CheckpointError, match=rf"step_00000002: could not be written: no space left on device "
                                                rf"\(needs ~{needed:.1f} MB, [0-9.]+ [MG]B free\); the previous "
                                                "checkpoints are intact$"):
        ckpt.wait()
    assert C.list_checkpoints(tmp_path) == [first]
    assert (C.checkpoint_root(tmp_path) / ".tmp_step_00000002").is_dir()
    C.Checkpointer(tmp_path, 0, 1, "run")  # the next start removes the half-written one
    assert [p.name for p in C.checkpoint_root(tmp_path).iterdir()] == [first.name]
    C.check_checkpoint(first)

    def broken(self, plan, planner):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(torch.distributed.checkpoint.FileSystemWriter, "write_data", broken)
    save(ckpt, model, tokenizer, optimizer, 3)
    with pytest.raises(C.CheckpointError, match=r"step_00000003: could not be written: rank 0: OSError: .*Input/output"):
        ckpt.wait()


@pytest.mark.parametrize("async_save", [True, False])
def test_a_full_disk_is_one_line_saying_so(tmp_path, tiny, async_save):
    """A real small filesystem (tmpfs, mounted by the test) that holds one checkpoint but not two."""
    import subprocess

    model, tokenizer, optimizer = tiny
    first = save(C.Checkpointer(tmp_path / "measure", 0, 1, "m", async_save=False), model, tokenizer, optimizer, 1)
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096}", "tmpfs",
                              str(small)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount permission): {mounted.stderr.strip()}")
    try:
        ckpt = C.Checkpointer(small, 0, 1, "run", async_save=async_save)
        kept = save(ckpt, model, tokenizer, optimizer, 1)
        ckpt.wait()
        with pytest.raises(C.CheckpointError) as err:
            save(ckpt, model, tokenizer, optimizer, 2)
            ckpt.wait()
        assert str(err.value).startswith(f"{C.checkpoint_root(small) / 'step_00000002'}: could not be written: "
                                         "no space left on device (needs ~")
        assert C.list_checkpoints(small) == [kept]
        C.check_checkpoint(kept)  # checksums included
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_keep_last_prunes_only_this_runs_complete_checkpoints_and_keeps_hf_copies(tmp_path, tiny):
    model, tokenizer, optimizer = tiny
    other = C.Checkpointer(tmp_path, 0, 1, "other-run", async_save=False)
    save(other, model, tokenizer, optimizer, 1)
    ahead = C.Checkpointer(tmp_path, 0, 1, "run", async_save=False)
    save(ahead, model, tokenizer, optimizer, 9)  # a later step of an abandoned branch of this run
    incomplete = C.checkpoint_root(tmp_path) / "step_00000003"  # trainer state, no state/.metadata
    incomplete.mkdir()
    (incomplete / C.TRAINER).write_bytes((C.checkpoint_root(tmp_path) / "step_00000009" / C.TRAINER).read_bytes())
    ckpt = C.Checkpointer(tmp_path, 0, 1, "run", keep_last=2, async_save=False)
    for step in (2, 4, 5, 6):
        save(ckpt, model, tokenizer, optimizer, step, hf=step == 4)
    names = [p.name for p in C.list_checkpoints(tmp_path)]
    assert names == ["step_00000001", "step_00000005", "step_00000006", "step_00000009"]
    root = C.checkpoint_root(tmp_path)
    assert not (root / "step_00000002").exists() and incomplete.is_dir()
    assert [p.name for p in (root / "step_00000004").iterdir()] == ["model"]  # its HF copy stays
    from transformers import AutoModelForCausalLM

    kept = AutoModelForCausalLM.from_pretrained(root / "step_00000004" / "model")
    for key, value in kept.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.fixture
def good(tmp_path, tiny):
    model, tokenizer, optimizer = tiny
    return save(C.Checkpointer(tmp_path / "run", 0, 1, "run", async_save=False), model, tokenizer, optimizer, 1)


def _truncate(path: Path) -> None:
    file = next((path / C.STATE).glob("*.distcp"))
    file.write_bytes(file.read_bytes()[:100])


def _corrupt_a_page(path: Path, name: str = "__0_0.distcp") -> None:
    """4 KiB inverted inside a model/optimizer shard: its size unchanged, its bytes not (zeroing
    them changed nothing where the shard already held zeros there: a run of zero optimizer states)."""
    file = path / C.STATE / name
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    file.write_bytes(bytes(data))


BREAK = {
    "no trainer state": (lambda p: (p / C.TRAINER).unlink(), "not a checkpoint directory"),
    "no metadata": (lambda p: (p / C.STATE / ".metadata").unlink(), "incomplete checkpoint: no state/.metadata"),
    "garbled metadata": (lambda p: (p / C.STATE / ".metadata").write_bytes(b"\x00garbage"), "corrupt checkpoint"),
    "missing shard": (lambda p: next((p / C.STATE).glob("*.distcp")).unlink(), "__0_0.distcp is missing"),
    "truncated shard": (_truncate, "__0_0.distcp has 100 bytes"),
    "zeroed page in a shard": (_corrupt_a_page, "corrupt checkpoint: state/__0_0.distcp fails its checksum"),
    "missing rng": (lambda p: (p / "rng_rank0.safetensors").unlink(), r"rng_rank0.safetensors is missing \(written by 1 rank\)"),
    "garbled trainer state": (lambda p: (p / C.TRAINER).write_bytes(b"nonsense"), "trainer_state.json unreadable"),
    "trainer state without its step": (lambda p: (p / C.TRAINER).write_text(json.dumps(
        {k: v for k, v in json.loads((p / C.TRAINER).read_text()).items() if k != "step"})),
        "trainer_state.json has no 'step'"),
}


@pytest.mark.parametrize("damage", list(BREAK))
def test_a_damaged_checkpoint_is_a_one_line_error_naming_it(good, damage, capsys):
    breaker, message = BREAK[damage]
    breaker(good)
    with pytest.raises(C.CheckpointError, match=message) as err:
        C.check_checkpoint(good)
    assert str(good) in str(err.value) and "\n" not in str(err.value)
    assert export_main(["--checkpoint", str(good), "--out", str(good.parent / "hf")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {err.value}"


def test_resuming_a_damaged_checkpoint_or_another_models_fails_before_training(good, tmp_path, capsys):
    args = ["train.prompts_per_step=4", "train.mini_batch_prompts=2", "sampling.group_size=2", "eval.every=0",
            "logging.progress=false", f"train.output_dir={tmp_path / 'new'}"]
    model, tokenizer, optimizer = trained("tiny-vl")
    other = save(C.Checkpointer(tmp_path / "vl", 0, 1, "vl", async_save=False), model, tokenizer, optimizer, 1)
    assert train_main([*args, "--resume-from", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {other}: checkpoint of another model: ")
    _corrupt_a_page(good)
    for resume in (["--resume-from", str(good)], ["--resume", f"train.output_dir={good.parent.parent}"]):
        assert train_main([*args, *resume]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (f"error: {good}: corrupt checkpoint: "
                                                                    "state/__0_0.distcp fails its checksum")
    _truncate(good)
    assert train_main([*args, "--resume-from", str(good)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {good}: incomplete checkpoint")
    assert not (tmp_path / "new" / "metrics.jsonl").exists()


def test_check_model_names_the_first_difference(good):
    shapes = {k: tuple(v.shape) for k, v in load_model(resolve_model_path("tiny"))[0].state_dict().items()}
    C.check_model(good, shapes)
    key = sorted(shapes)[0]
    with pytest.raises(C.CheckpointError, match=f"{key} is .* there, \\[3\\] here"):
        C.check_model(good, {**shapes, key: (3,)})
    with pytest.raises(C.CheckpointError, match="1 tensors missing and 0 unexpected \\(extra.weight"):
        C.check_model(good, {**shapes, "extra.weight": (3,)})


def test_rng_streams_continue_at_the_same_world_size_and_are_re_derived_at_another(good):
    draw = lambda: (random.random(), float(np.random.rand()), float(torch.rand(())))  # noqa: E731
    C.set_rng_state(read_rng(good / "rng_rank0.safetensors"))
    expected = draw()
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    C.restore_rng(good, rank=0, world=1, seed=0)
    assert draw() == expected
    draws = []
    for rank in (0, 1, 0):
        C.restore_rng(good, rank=rank, world=2, seed=0)  # saved by 1 rank, resumed on 2
        draws.append(draw())
    assert draws[0] == draws[2] != draws[1]
    torch.manual_seed(C.derived_seed(0, 1, 1))
    assert float(torch.rand(())) == draws[1][2]
    assert len({C.derived_seed(0, 1, 0), C.derived_seed(0, 2, 0), C.derived_seed(1, 1, 0)}) == 3


def test_rng_files_keep_every_field_exactly(tmp_path):
    """Python's and numpy's cached normal draws too: resuming continues the same streams."""
    random.gauss(0, 1)
    np.random.randn()
    state = C.rng_state()
    assert state["python"][2] is not None and state["numpy"][3] == 1  # both hold a cached normal draw
    write_rng(state, tmp_path / "rng.safetensors")
    got = read_rng(tmp_path / "rng.safetensors")
    assert got["python"] == state["python"] and torch.equal(got["torch"], state["torch"])
    assert got["numpy"][0] == state["numpy"][0] and got["numpy"][2:] == state["numpy"][2:]
    assert got["numpy"][1].dtype == state["numpy"][1].dtype and np.array_equal(got["numpy"][1], state["numpy"][1])


def _older_format(path: Path) -> None:
    """Checkpoint ``path`` as medix_fast wrote it before checkpoint_files.py: its trainer and RNG state pickled."""
    torch.save(C.load_trainer_state(path), path / "trainer_state.pt")
    torch.save(read_rng(path / "rng_rank0.safetensors"), path / "rng_rank0.pt")
    (path / C.TRAINER).unlink()
    (path / "rng_rank0.safetensors").unlink()


def test_an_older_checkpoint_still_loads_its_pickles_with_weights_only(good):
    trainer_state, rng = C.load_trainer_state(good), read_rng(good / "rng_rank0.safetensors")
    _older_format(good)
    assert C.list_checkpoints(good.parent.parent) == [good] and C.check_checkpoint(good) == good
    assert C.load_trainer_state(good) == trainer_state
    draw = lambda: (random.random(), float(np.random.rand()), float(torch.rand(())))  # noqa: E731
    C.set_rng_state(rng)
    expected = draw()
    C.restore_rng(good, rank=0, world=1, seed=0)
    assert draw() == expected


class _Payload:
    """Creates the file ``marker`` when unpickled: what a pickle from elsewhere can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _code_in_trainer_state(path: Path, marker: Path) -> None:
    _older_format(path)
    torch.save({**C.load_trainer_state(path), "scheduler": _Payload(marker)}, path / "trainer_state.pt")


def _code_in_rng(path: Path, marker: Path) -> None:
    _older_format(path)
    torch.save({"python": _Payload(marker)}, path / "rng_rank0.pt")


def _code_in_metadata(path: Path, marker: Path) -> None:
    from medix_fast.safe_load import read_metadata

    metadata = read_metadata(path / C.STATE / ".metadata")
    metadata.planner_data = _Payload(marker)
    (path / C.STATE / ".metadata").write_bytes(pickle.dumps(metadata))


def _code_in_a_shard_entry(path: Path, marker: Path) -> None:
    """A non-tensor entry (as the optimizer's hyper-parameters are), its shard's checksum right."""
    shutil.rmtree(path / C.STATE)
    D.save_shards({"entry": _Payload(marker)}, path / C.STATE, None, asynchronous=False)


CODE = {  # the part carrying a payload: (plant it, read the checkpoint as a resume does)
    "trainer_state.pt": (_code_in_trainer_state, C.check_checkpoint),
    "rng_rank0.pt": (_code_in_rng, lambda p: C.restore_rng(p, rank=0, world=1, seed=0)),
    "state/.metadata": (_code_in_metadata, C.check_checkpoint),
    "a non-tensor entry of state/": (_code_in_a_shard_entry, lambda p: C.load_state(p, {"entry": None})),
}


@pytest.mark.parametrize("part", list(CODE))
def test_a_checkpoint_carrying_code_is_refused_before_any_of_it_runs(good, part, tmp_path, capsys):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # read as pickles were before, it runs
    assert marker.exists()
    marker.unlink()
    plant, read = CODE[part]
    plant(good, marker)
    with pytest.raises(C.CheckpointError) as err:
        read(good)
    assert str(err.value) == (f"{good}: refused: {part} names io.open, which is code, not checkpoint data "
                              "(loading it would run it)")
    if read is C.check_checkpoint:
        assert export_main(["--checkpoint", str(good), "--out", str(tmp_path / "hf")]) == 2
        assert capsys.readouterr().err.strip() == f"error: {err.value}"
    assert not marker.exists()


def test_vl_export_carries_the_image_processor(tmp_path):
    model, tokenizer, optimizer = trained("tiny-vl")
    processor = load_image_processor(resolve_model_path("tiny-vl"))
    path = save(C.Checkpointer(tmp_path, 0, 1, "vl", async_save=False), model, tokenizer, optimizer, 1,
                processor=processor)
    out = export(path, tmp_path / "hf", torch.bfloat16)
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key].to(torch.bfloat16)), key
    assert AutoImageProcessor.from_pretrained(out).to_dict() == processor.to_dict()
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template


def test_moe_export_writes_the_hub_layout_and_loads_back(tmp_path):
    """A Qwen3-VL-MoE checkpoint exports its expert banks as the Hub lays them out (through
    model.moe.save_pretrained, like the trainer's own model/), and load_model reads them back equal."""
    from safetensors import safe_open

    model, tokenizer, optimizer = trained("tiny-vl-moe")
    path = save(C.Checkpointer(tmp_path, 0, 1, "moe", async_save=False), model, tokenizer, optimizer, 1,
                hf=True, processor=load_image_processor(resolve_model_path("tiny-vl-moe")))
    text = model.config.text_config
    for out in (export(path, tmp_path / "hf"), path / C.HF_MODEL):
        with safe_open(str(out / "model.safetensors"), "pt") as f:  # (E, H, 2I) / (E, I, H), as on the Hub
            prefix = "model.language_model.layers.0.mlp.experts."
            assert f.get_slice(prefix + "gate_up_proj").get_shape() == [4, text.hidden_size,
                                                                         2 * text.moe_intermediate_size]
            assert f.get_slice(prefix + "down_proj").get_shape() == [4, text.moe_intermediate_size, text.hidden_size]
        loaded, _ = load_model(out)
        assert loaded.state_dict().keys() == model.state_dict().keys()
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (out, key)


# ----------------------------------------------------------------------------- two ranks
@pytest.fixture(scope="module")
def two_rank_checkpoint(two_ranks):
    """Written by 2 FSDP ranks at step 2, then step 3 run on (ckpt_worker.train's folder)."""
    return two_ranks.folder("ckpt_train")


@pytest.fixture(scope="module")
def two_rank_resume(two_ranks):
    """That checkpoint resumed by 2 ranks, step 3 run again (ckpt_worker.resume's folder)."""
    return two_ranks.folder("ckpt_resume")


TINY_LR = load_config(None, []).optim.lr


def assert_same_state(got: dict, want: dict) -> None:
    assert got["step"] == want["step"] == 2
    assert got["groups"] == want["groups"] and want["groups"][0]["lr"] == TINY_LR  # after tiny.yaml's 2 warm-up steps
    assert got["model"].keys() == want["model"].keys() and got["optimizer"].keys() == want["optimizer"].keys()
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    for key, moments in want["optimizer"].items():
        for name, value in moments.items():
            assert torch.equal(got["optimizer"][key][name], value), (key, name)


def test_two_rank_checkpoint_resumes_at_two_ranks_exactly(two_rank_checkpoint, two_rank_resume):
    out = two_rank_checkpoint
    reference = torch.load(out / "reference.pt", weights_only=False)
    assert_same_state(torch.load(two_rank_resume / "resumed_2.pt", weights_only=False), reference)
    resumed = json.loads((two_rank_resume / "resumed.json").read_text())
    assert resumed == json.loads((out / "uninterrupted.json").read_text())
    path = C.latest_checkpoint(out / "run")
    assert path.name == "step_00000002" and C.load_trainer_state(path)["world"] == 2
    assert sorted(p.name for p in (path / C.STATE).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_rank_checkpoint_resumes_in_one_process(two_rank_checkpoint, strategy, tmp_path):
    out = two_rank_checkpoint
    reference = torch.load(out / "reference.pt", weights_only=False)
    path = C.latest_checkpoint(out / "run")
    trainer = Trainer(config(tmp_path / "one", strategy), resume=str(path))
    try:
        assert (trainer.info.world, D._fsdp_modules(trainer.wrapped) != []) == (1, strategy == "fsdp")
        assert_same_state(full_state(trainer), reference)
        metrics = trainer.train_step()
        assert trainer.step == 3 and np.isfinite(metrics["loss"])
        assert comparable(metrics).keys() == json.loads((out / "uninterrupted.json").read_text()).keys()
    finally:
        D.close()


def test_one_process_verifies_every_shard_of_a_two_rank_checkpoint(two_rank_checkpoint, tmp_path):
    path = Path(shutil.copytree(C.latest_checkpoint(two_rank_checkpoint / "run"), tmp_path / "step_00000002"))
    C.check_checkpoint(path)
    _corrupt_a_page(path, "__1_0.distcp")  # the second rank's shard
    with pytest.raises(C.CheckpointError, match=r"corrupt checkpoint: state/__1_0\.distcp fails its checksum$"):
        C.check_checkpoint(path)


def test_two_ranks_verify_each_shard_once(two_rank_resume):
    verified = [json.loads((two_rank_resume / f"verified_rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(v) for v in verified] == [1, 1] and sorted(verified[0] + verified[1]) == ["__0_0.distcp",
                                                                                          "__1_0.distcp"]


def test_export_from_a_two_rank_checkpoint(two_rank_checkpoint, tmp_path, capsys):
    reference = torch.load(two_rank_checkpoint / "reference.pt", weights_only=False)["model"]
    path = C.latest_checkpoint(two_rank_checkpoint / "run")
    assert export_main(["--checkpoint", str(path), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.state_dict().keys() == reference.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template
    assert not list(tmp_path.glob(".tmp_*"))
    model = load_checkpoint_model(path)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_each_shard_carries_the_checksum_computed_while_writing(good, monkeypatch):
    """The CRC-32 in the metadata is the file's, taken from the bytes as written: no file is read back."""
    from medix_fast.checksums import file_crc

    checksums = C.read_metadata(good).checksums
    assert sorted(checksums) == ["__0_0.distcp"]
    assert checksums["__0_0.distcp"] == file_crc(good / C.STATE / "__0_0.distcp")
    model, tokenizer, optimizer = trained()
    monkeypatch.setattr("medix_fast.checksums.file_crc", lambda path: pytest.fail(f"{path} read back"))
    again = save(C.Checkpointer(good.parent.parent / "again", 0, 1, "again", async_save=True), model, tokenizer,
                 optimizer, 1)
    C.wait_all()
    monkeypatch.undo()
    assert C.read_metadata(again).checksums == {"__0_0.distcp": file_crc(again / C.STATE / "__0_0.distcp")}


def test_export_never_deletes_what_it_did_not_write(good, tmp_path, capsys):
    run = tmp_path / "run"  # the run's own folder: its checkpoints and a user's notes
    (run / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert export_main(["--checkpoint", str(good), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {run} holds files that are not a previous export (checkpoints, notes.txt)")
    assert "\n" not in err and sorted(p.relative_to(run) for p in run.rglob("*")) == before
    hf = tmp_path / "hf"
    for _ in range(2):  # a previous export is replaced
        assert export_main(["--checkpoint", str(good), "--out", str(hf)]) == 0
    assert (hf / "config.json").is_file() and not list(tmp_path.glob(".tmp_*")) and not list(tmp_path.glob("hf.old-*"))
    (hf / "notes.txt").write_text("added by hand")  # no longer only an export's files: refused
    assert export_main(["--checkpoint", str(good), "--out", str(hf)]) == 2
    assert export_main(["--checkpoint", str(good), "--out", str(run), "--overwrite"]) == 0
    assert (tmp_path / "run.old-1" / "notes.txt").read_text() == "mine"
    assert sorted(p.relative_to(tmp_path / "run.old-1") for p in (tmp_path / "run.old-1").rglob("*")) == before
    assert (run / "config.json").is_file() and (run / ".medix_fast_export.json").is_file()
