"""Config loading: YAML + dotted overrides, typed checks that name the bad key, packaged configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medix_fast.config import DEFAULT_CONFIG, ConfigError, load_config, save_config

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_default_is_the_packaged_tiny_config():
    assert DEFAULT_CONFIG.name == "tiny.yaml" and DEFAULT_CONFIG.exists()
    cfg = load_config()
    assert cfg.model.path == "tiny"
    assert cfg.data.train_files == ["sample:train"]


def test_overrides_are_yaml_scalars(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  steps: 5\n"),
                      ["optim.lr=1e-5", "train.steps=7", "data.strict=false", "algorithm.clip_ratio_c=null",
                       "data.train_files=[a.jsonl, b.parquet]", "rewards.weights.format=0.5", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == pytest.approx(1e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7
    assert cfg.data.strict is False
    assert cfg.algorithm.clip_ratio_c is None
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"]
    assert cfg.rewards.weights["format"] == 0.5
    assert cfg.optim.betas == [0.9, 0.95]


def test_int_accepted_for_float_and_yaml_exponent_string(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-6\n  grad_clip: 2\n"))
    assert cfg.optim.lr == pytest.approx(1e-6) and cfg.optim.grad_clip == 2.0


@pytest.mark.parametrize("override, named", [
    ("train.stepz=3", "train.stepz"),
    ("trian.steps=3", "trian"),
    ("train.steps=three", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("data.strict=maybe", "data.strict"),
    ("algorithm.loss_type=ppo", "algorithm.loss_type"),
    ("distributed.strategy=deepspeed", "distributed.strategy"),
    ("optim.lr=fast", "optim.lr"),
    ("data.train_files=a.jsonl", "data.train_files"),
    ("rewards.weights.format=high", "rewards.weights.format"),
    ("rewards.judge_modle=x", "rewards.judge_modle"),
    ("train.steps=0", "train.steps"),
    ("sampling.group_size=1", "sampling.group_size"),
    ("train.mini_batch_prompts=1000", "train.mini_batch_prompts"),
    ("sampling.max_batch_size=64", "sampling.max_num_seqs"),  # renamed: the message names the new key
    ("sampling.max_num_seqs=0", "sampling"),
    ("sampling.gpu_memory_utilization=1.5", "sampling"),
    ("sampling.block_size=24", "sampling.block_size"),
    ("sampling.block_size=8", "tl.dot needs 16"),
    ("distributed.timeout_min=0", "distributed: need timeout_min > 0"),
    ("distributed.dead_after_s=5", "dead_after_s > heartbeat_s"),
    ("distributed.heartbeat_s=-1", "distributed: need"),
    ("distributed.stall_warn_s=0", "distributed: need"),
    ("optim.offload=params", "optim.offload: params is FSDP2's CPU offload and needs distributed.strategy"),
    ("optim.state_rounding=stochastic", "optim.state_rounding: stochastic rounds bfloat16 states"),
])
def test_bad_key_or_value_names_the_dotted_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("other", ["train.device=cuda", "sampling.tensor_parallel=2", "distributed.strategy=fsdp",
                                   "model.dtype=float16"])
def test_exact_refuses_in_one_line_what_it_cannot_make_exact(other):
    with pytest.raises(ConfigError, match=r"^sampling\.exact: CPU only[^\n]*$"):
        load_config(None, ["sampling.exact=true", other])


def test_bad_key_in_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"sampling\.temprature"):
        load_config(write(tmp_path, "sampling:\n  temprature: 0.7\n"))


@pytest.mark.parametrize("override, suggestion", [("train.stpes=3", "'train.steps'"), ("trian.steps=3", "'train'"),
                                                  ("rewards.judge_modle=x", "'rewards.judge_model'")])
def test_a_misspelt_key_gets_a_suggestion(override, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}"):
        load_config(None, [override])
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.xyz=1"])
    assert "did you mean" not in str(err.value)  # nothing close: no guess


def test_a_list_key_given_one_value_shows_the_list_syntax():
    with pytest.raises(ConfigError, match=r"data\.train_files=\[a\.jsonl\], several: data\.train_files=\[a,b\]"):
        load_config(None, ["data.train_files=a.jsonl"])


def test_a_yaml_error_names_file_line_and_column(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  steps: 3\n  seed: [1\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    assert str(err.value).startswith(f"config file {tmp_path / 'c.yaml'}:4:1 is not valid YAML: ")
    assert "<unicode string>" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["train.steps", "=3", "train..steps=3", "train.steps=[1,"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="override"):
        load_config(None, [text])


def test_base_chain_and_loop(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 9\n  seed: 4\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  steps: 3\n")
    cfg = load_config(child)
    assert (cfg.train.steps, cfg.train.seed) == (3, 4)
    (tmp_path / "base.yaml").write_text("base: child.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(child)


def test_trl_loss_options_and_easyr1_clamps():
    """EasyR1's clamps by default (MediX-R1 trained with them); TRL 1.16's loss types load."""
    cfg = load_config(None, [])
    assert (cfg.algorithm.kl_clamp, cfg.algorithm.log_ratio_clamp) == (10.0, 20.0)
    cfg = load_config(None, ["algorithm.loss_type=cispo", "algorithm.epsilon_high=5.0", "algorithm.kl_clamp=null",
                             "algorithm.delta=4.0", "algorithm.use_bias_correction_kl=true"])
    assert cfg.algorithm.loss_type == "cispo" and cfg.algorithm.kl_clamp is None and cfg.algorithm.delta == 4.0


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=11", "algorithm.tis_cap=2.0"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["train"]["steps"] == 11
    assert load_config(tmp_path / "out" / "config.yaml") == cfg


@pytest.mark.parametrize("name", ["tiny", "tiny_vl_moe", "medix_r1_2b_dapo", "medix_r1_8b_dapo", "medix_r1_8b_grpo",
                                  "medix_r1_7b_gspo", "medix_r1_30b_a3b_dapo"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO_CONFIGS / f"{name}.yaml")
    if name.startswith("medix"):  # the recipe's shared settings
        assert (cfg.sampling.group_size, cfg.train.prompts_per_step, cfg.train.mini_batch_prompts) == (5, 512, 128)
        assert cfg.optim.lr == pytest.approx(1e-6) and cfg.optim.weight_decay == pytest.approx(1e-2)
        assert cfg.rewards.weights == pytest.approx({"accuracy": 0.5175, "semantic": 0.3375, "modality": 0.045,
                                                     "format": 0.1})
    if name.endswith("dapo"):
        assert cfg.algorithm.dynamic_sampling and cfg.algorithm.epsilon_high == pytest.approx(0.28)
    if name.endswith("grpo"):
        assert cfg.algorithm.beta == pytest.approx(1e-2) and cfg.algorithm.epsilon_high == pytest.approx(0.3)
    if name.endswith("gspo"):
        assert cfg.algorithm.importance_sampling_level == "sequence_token"
        assert (cfg.algorithm.epsilon_low, cfg.algorithm.epsilon_high) == pytest.approx((3e-4, 4e-4))


@pytest.mark.parametrize("overrides, named", [
    (["eval.protocol=medix_r1"], "eval.protocol: medix_r1 is greedy .*samples do not apply"),  # tiny: samples 8
    (["eval.protocol=medix_r1", "eval.samples=0"], "eval.protocol: medix_r1 needs a judge"),
    (["eval.protocol=medix_r1", "eval.samples=0", "eval.judge_model=j", "rewards.weights.accuracy=0"], None),
    (["eval.protocol=medix_r1", "eval.samples=0", "rewards.judge_model=j"], None),
    (["eval.protocol=medix_r1", "eval.samples=0", "rewards.judge_model=j", "rewards.weights.accuracy=0"],
     "needs a judge"),  # the reward holds no judge when its accuracy is off
    (["eval.judge_model=j"], "eval.judge_model, eval.judge_batch and eval.data_dir are for eval.protocol: medix_r1"),
    (["eval.protocol=medix_r1", "eval.samples=0", "eval.judge_model=j", "eval.judge_batch=0"], "eval.judge_batch"),
    (["eval.protocol=r1"], "eval.protocol"),
])
def test_eval_protocol_combinations(overrides, named):
    if named is None:
        assert load_config(None, overrides).eval.protocol == "medix_r1"
        return
    with pytest.raises(ConfigError, match=named):
        load_config(None, overrides)
