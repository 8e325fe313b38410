"""LLaMA-Factory's example YAML files for GaLore, APOLLO and BAdam run through `gradspace finetune --config FILE`
with only `model_name_or_path` and `dataset` changed; every key is mapped or reported as having no effect, and a
key outside the table is an error naming it."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import run
from gradspace.train import assets, llamafactory
from gradspace.train.config import FINETUNE, read_config_file
from test_cli import assert_clean_error

ROOT = Path(__file__).resolve().parent.parent

# examples/extras/{galore,apollo,badam}/llama3_full_sft.yaml as LLaMA-Factory ships them; MODEL and DATA replace
# model_name_or_path and dataset
GALORE = """### model
model_name_or_path: MODEL

### method
stage: sft
do_train: true
finetuning_type: full
use_galore: true
galore_layerwise: true
galore_target: mlp,self_attn
galore_rank: 128
galore_scale: 2.0

### dataset
dataset: DATA
template: llama3
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/full/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 1
learning_rate: 0.0001
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_steps: 0.1
pure_bf16: true

### eval
val_size: 0.1
per_device_eval_batch_size: 1
evaluation_strategy: steps
eval_steps: 500
"""
APOLLO = """### model
model_name_or_path: MODEL
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: full
use_apollo: true
apollo_layerwise: true  # choices: [true, false], use false for DDP training
apollo_target: all
apollo_rank: 128
apollo_scale: 32.0
apollo_scale_type: channel

### dataset
dataset: DATA
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/full/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 1  # use 1 for layerwise apollo
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
pure_bf16: true
ddp_timeout: 180000000

### eval
# val_size: 0.1
# per_device_eval_batch_size: 1
# eval_strategy: steps
# eval_steps: 500
"""
BADAM = """### model
model_name_or_path: MODEL

### method
stage: sft
do_train: true
finetuning_type: full
use_badam: true
badam_mode: layer
badam_switch_mode: ascending
badam_switch_interval: 50
badam_verbose: 2
# deepspeed: examples/deepspeed/ds_z3_config.json

### dataset
dataset: DATA
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/full/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A tiny GPT-2 with 2,048 positions (the files' cutoff_len), 10 alpaca rows, and the three files."""
    monkeypatch.chdir(tmp_path)  # LLaMA-Factory resolves output_dir from where it runs
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=2048, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    assets.tokenizer().save_pretrained(tmp_path / "model")
    rows = [{"instruction": f"Repeat {w}.", "input": "", "output": w} for w in "abcdefghij"]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    out = {}
    for name, text in (("galore", GALORE), ("apollo", APOLLO), ("badam", BADAM)):
        text = text.replace("MODEL", str(tmp_path / "model")).replace("DATA", "data.json")
        (tmp_path / f"{name}.yaml").write_text(text)
        out[name] = tmp_path / f"{name}.yaml"
    return out


def test_the_galore_file_maps_to_these_options(files):
    got = read_config_file(str(files["galore"]), FINETUNE.defaults)
    want = {
        "objective": "sft",
        "method": "galore",
        "target_modules": ["mlp", "self_attn"],
        "rank": 128,
        "update_gap": 200,
        "scale": 2.0,
        "proj_type": "std",
        "layerwise": True,
        "grad_clip": 0.0,  # layer-wise: never the whole gradient to clip
        "template": "llama3",
        "max_length": 1024,
        "max_samples": 1000,
        "val_size": 0.1,
        "lr": 1e-4,
        "batch_size": 1,
        "grad_accum": 1,
        "scheduler": "cosine",
        "dtype": "bfloat16",
        "log_every": 10,
        "save_every": 500,
        "steps": 27,  # 3 epochs of the 9 training rows (one of 10 held out), one a step
        "warmup": 3,  # warmup_steps 0.1: a ratio
        "eval_every": 500,
        "seed": 42,
        "weight_decay": 0.0,
    }
    assert {k: got[k] for k in want} == want
    assert got["task"].endswith("data.json") and got["model"].endswith("model")


def test_the_apollo_and_badam_files_map_their_methods(files):
    apollo = read_config_file(str(files["apollo"]), FINETUNE.defaults)
    assert (apollo["method"], apollo["rank"], apollo["scale"], apollo["target_modules"]) == (
        "apollo",
        128,
        32.0,
        ["all-linear"],
    )
    assert apollo["optim_args"] == "scale_type=channel" and apollo["eval_every"] == 0 and apollo["warmup"] == 3
    badam = read_config_file(str(files["badam"]), FINETUNE.defaults)
    assert badam["method"] == "badam" and badam["optim_args"] == "switch_block_every=50,switch_mode=ascending"
    assert badam["steps"] == 4 and badam["grad_accum"] == 8  # ceil(3 x 9 / 8)


@pytest.mark.parametrize("name", ["galore", "apollo", "badam"])
def test_each_example_file_runs_as_it_is(files, name, capsys):
    assert run("finetune", "--config", files[name], "--threads", "1", "--eval-prompts", "1") == 0
    out = Path("saves/llama3-8b/full/sft")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == name and summary["template"] == "llama3" and (out / "model" / "config.json").exists()
    err = capsys.readouterr().err
    (notice,) = [ln for ln in err.splitlines() if "LLaMA-Factory file" in ln]
    assert "overwrite_cache" in notice and "preprocessing_num_workers" in notice and "plot_loss" in notice


def test_a_key_outside_the_table_is_an_error_naming_it(files, capsys):
    text = files["galore"].read_text() + "flash_attn: fa2\nenable_liger_kernel: true\n"
    files["galore"].write_text(text)
    assert_clean_error(capsys, run("finetune", "--config", files["galore"]), "enable_liger_kernel, flash_attn")
    assert not Path("saves").exists()


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (("stage: sft", "stage: dpo"), ["stage 'dpo'", "only sft"]),
        (("finetuning_type: full", "finetuning_type: freeze"), ["finetuning_type 'freeze'"]),
        (("evaluation_strategy: steps", "evaluation_strategy: best"), ["eval_strategy 'best'"]),
        (("template: llama3", "template: mistral"), ["template", "mistral"]),
        (("overwrite_cache: true", "packing: 'false'"), ["packing"]),
        (("overwrite_cache: true", "resume_from_checkpoint: saves/x"), ["resume_from_checkpoint", "--resume"]),
        (("logging_steps: 10", "logging_steps: 0"), ["logging_steps 0"]),
    ],
)
def test_a_value_gradspace_cannot_honour_is_an_error(files, capsys, edit, words):
    files["galore"].write_text(files["galore"].read_text().replace(*edit))
    assert_clean_error(capsys, run("finetune", "--config", files["galore"]), *words)


def test_the_trainers_readings_of_steps_and_strategies(files):
    """Below 1, logging/save/eval steps are shares of the run (as the Trainer reads them); a bare `no` is YAML's
    false; eval_dataset is a local file; resume_from_checkpoint: null is fine."""
    text = files["galore"].read_text()
    text = text.replace("logging_steps: 10", "logging_steps: 0.1").replace("eval_steps: 500", "eval_steps: 0.5")
    text += "eval_dataset: data.json\nresume_from_checkpoint: null\n"
    files["galore"].write_text(text)
    got = read_config_file(str(files["galore"]), FINETUNE.defaults)
    assert got["steps"] == 30 and got["log_every"] == 3 and got["eval_every"] == 15  # 10 rows all train
    assert got["eval_dataset"].endswith("data.json")
    files["galore"].write_text(text.replace("evaluation_strategy: steps", "evaluation_strategy: no"))
    assert read_config_file(str(files["galore"]), FINETUNE.defaults)["eval_every"] == 0


def test_the_readme_table_is_the_code_table():
    readme = (ROOT / "README.md").read_text()
    assert llamafactory.table() in readme
    assert set(re.findall(r"\| `(\w+)` \|", llamafactory.table())) == set(llamafactory.KEYS)
