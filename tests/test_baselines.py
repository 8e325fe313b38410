"""The papers' baselines as methods: LoRA, DoRA, ReLoRA, BAdam, low-rank and 8-bit AdamW, through pretrain,
finetune and compare: exact resume, exported models that other tools load, what each one trains and keeps."""

import csv
import itertools
import json
import math

import pytest
import torch
from torch import nn

from conftest import lines, run
from gradspace.baselines import BASELINES
from gradspace.baselines.lowrank import Factorised
from gradspace.baselines.relora import ReLoRA, prune_moments
from gradspace.train.checkpoint import list_checkpoints, load_checkpoint

torch.set_num_threads(1)
SMALL = ["--steps", "6", "--seq-len", "32", "--batch-size", "4", "--eval-every", "3", "--eval-batches", "2"]
SMALL += ["--threads", "1", "--tokenizer", "chars", "--log-every", "1"]
#: options that make each baseline's own mechanism happen inside a 6-step run (a restart, a block switch)
OWN = {"relora": ["--optim-args", "reset_every=2,restart_warmup=2"], "badam": ["--optim-args", "switch_block_every=2"]}


def assert_clean_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    msg = [ln for ln in err.splitlines() if ln.startswith("gradspace: error:")]
    assert len(msg) == 1, err
    for w in words:
        assert w in msg[0], msg[0]


def final_model(folder):
    return load_checkpoint(list_checkpoints(folder / "checkpoints")[-1])["model"]


def curve(folder):
    return [
        (r["type"], r["step"], r.get("loss"), r.get("lr"), r.get("val_loss")) for r in lines(folder / "metrics.jsonl")
    ]


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_a_baseline_trains_resumes_bit_identically_and_exports_a_plain_model(tmp_path, capsys, method):
    from transformers import AutoModelForCausalLM

    args = [*SMALL, "--method", method, *OWN.get(method, [])]
    assert run("pretrain", *args, "--out", tmp_path / "full") == 0
    assert run("pretrain", *args, "--out", tmp_path / "cut", "--stop-after", "3") == 130
    assert run("pretrain", "--resume", tmp_path / "cut", "--threads", "1") == 0
    full, cut = final_model(tmp_path / "full"), final_model(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    assert curve(tmp_path / "full") == curve(tmp_path / "cut")
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["method"] == method and summary["state_bytes"] > 0 and summary["trainable_params"] > 0
    losses = [r["loss"] for r in lines(tmp_path / "full" / "metrics.jsonl") if r["type"] == "train"]
    assert all(math.isfinite(x) for x in losses)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model")
    names = {n for n, _ in exported.named_parameters()}
    assert not any("lora" in n or "lowrank" in n or "base_layer" in n for n in names)


def _merged_weight(state, name, alpha, rank):
    """``W + (alpha / r) B A`` of one LoRA-adapted weight, from a checkpoint's peft state."""
    prefix = f"base_model.model.{name}"
    w = state[f"{prefix}.base_layer.weight"]
    return w + (alpha / rank) * state[f"{prefix}.lora_B.default.weight"] @ state[f"{prefix}.lora_A.default.weight"]


def test_lora_trains_adapters_and_the_rest_and_exports_the_merge(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--method", "lora", "--rank", "4", "--optim-args", "lora_alpha=8", "--out", out) == 0
    state = final_model(out)  # peft's own name for alpha
    first = load_checkpoint(list_checkpoints(out / "checkpoints")[0])["model"]
    q = "model.layers.0.self_attn.q_proj"
    # the adapted weight is frozen, its adapter and everything outside the adapted modules train
    assert torch.equal(
        state[f"base_model.model.{q}.base_layer.weight"], first[f"base_model.model.{q}.base_layer.weight"]
    )
    assert state[f"base_model.model.{q}.lora_A.default.weight"].shape == (4, 64)
    exported = load_file(out / "model" / "model.safetensors")
    torch.testing.assert_close(exported[f"{q}.weight"], _merged_weight(state, q, 8.0, 4), rtol=0, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    adapters = sum(v.numel() for k, v in state.items() if "lora_" in k)
    rest = {v.data_ptr(): v.numel() for k, v in state.items() if "lora_" not in k and "base_layer" not in k}
    rest = sum(rest.values())  # a tied head and embedding are one parameter
    assert summary["trainable_params"] == adapters + rest
    assert not (out / "adapter").exists()  # a preset trained from scratch has no base model to load one onto


def test_lora_uses_the_same_weights_a_subspace_method_projects(tmp_path):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--steps", "2", "--method", "dora", "--target-modules", "mlp", "--out", out) == 0
    state = final_model(out)
    adapted = {k.split(".base_layer")[0].rsplit(".", 1)[-1] for k in state if ".base_layer.weight" in k}
    assert adapted == {"gate_proj", "up_proj", "down_proj"}
    assert any("lora_magnitude_vector" in k for k in state)  # DoRA's magnitudes


@pytest.fixture
def sentiment_csv(tmp_path):
    path = tmp_path / "sentiment.csv"
    words = {1: ["wonderful", "brilliant", "superb", "moving"], 0: ["awful", "boring", "dreadful", "dull"]}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for label, adjectives in words.items():
            for s, a in itertools.product(["the movie", "this film", "the plot", "the cast"], adjectives):
                w.writerow([f"{s} was {a}", label])
    return path


def test_a_finetuned_lora_run_writes_a_peft_adapter_that_loads_onto_its_base(tmp_path, sentiment_csv):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gradspace.train.encoder import model_source

    out = tmp_path / "run"
    argv = ["finetune", "--task", sentiment_csv, "--method", "lora", "--steps", "4", "--lr", "1e-3", "--out", out]
    assert run(*argv, "--batch-size", "8", "--max-length", "16", "--threads", "1") == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    base = AutoModelForSequenceClassification.from_pretrained(model_source("minilm")[0], num_labels=2)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    batch = tok(["the movie was superb", "the plot was dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, merged(**batch).logits, rtol=1e-4, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    encoder = sum(p.numel() for p in merged.parameters())
    assert summary["trainable_params"] < 0.1 * encoder  # adapters and the head only


def _peft_model(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))


def test_a_relora_restart_merges_without_changing_the_function_and_prunes_moments():
    from gradspace import create_optimizer

    model = _peft_model()
    opt = create_optimizer("adamw", model, 1e-2)
    x = torch.randn(8, 12)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    before = model(x).detach()
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    ReLoRA().after_step(model, opt, 4, {**ReLoRA.defaults, "reset_every": 4, "prune": 0.75}, steps=8, seed=0)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)  # the merge keeps the function
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert not p.any()
    for p in adapters:
        m = opt.state[p]["rule"]["exp_avg"]
        assert 0 < int(m.count_nonzero()) <= math.ceil(m.numel() * 0.25)
    again = _peft_model()
    opt2 = create_optimizer("adamw", again, 1e-2)
    for _ in range(3):
        opt2.zero_grad()
        again(x).pow(2).mean().backward()
        opt2.step()
    ReLoRA().after_step(again, opt2, 4, {**ReLoRA.defaults, "reset_every": 4, "prune": 0.75}, steps=8, seed=0)
    for (n, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(p, q), n  # the restart's draw is seeded by (seed, step)


def test_magnitude_pruning_keeps_the_largest_entries():
    from gradspace import create_optimizer

    p = nn.Parameter(torch.zeros(10))
    opt = create_optimizer("adamw", [p], 1e-2)
    p.grad = torch.arange(10.0) - 4.5
    opt.step()
    m = opt.state[p]["rule"]["exp_avg"].clone()
    prune_moments(opt, [p], 0.8)
    kept = opt.state[p]["rule"]["exp_avg"].nonzero().flatten().tolist()
    assert kept == m.abs().topk(2).indices.sort().values.tolist()


def test_relora_schedule_is_jagged(tmp_path):
    out = tmp_path / "run"
    args = ["--scheduler", "constant_with_warmup", "--warmup", "1", "--lr", "1e-3"]
    opts = ["--optim-args", "reset_every=3,restart_warmup=2"]
    assert run("pretrain", *SMALL, "--steps", "8", *args, "--method", "relora", *opts, "--out", out) == 0
    lr = [r["lr"] for r in lines(out / "metrics.jsonl") if r["type"] == "train"]
    # steps 1-3 follow the schedule (a warm-up step at 0), then each restart (after steps 3 and 6) ramps over 2
    assert lr == pytest.approx([0.0, 1e-3, 1e-3, 5e-4, 1e-3, 1e-3, 5e-4, 1e-3])


def _block(name):
    parts = name.split(".")
    return f"layer {parts[2]}" if "layers" in parts else ("embedding" if "embed" in name else "norm and head")


def test_badam_changes_one_block_at_a_time_in_order_with_one_blocks_state():
    from gradspace import create_optimizer
    from gradspace.train.models import build_llama

    torch.manual_seed(0)
    model = build_llama("tiny", 40)
    badam = BASELINES["badam"]
    own = {**badam.defaults, "switch_block_every": 2}
    opt = badam.optimizer(model, 1e-2, "adamw", {}, own, True, weight_decay=0.0)
    ids = torch.randint(0, 40, (2, 16))
    changed = []
    for _ in range(8):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        changed.append({_block(n) for n, p in model.named_parameters() if not torch.equal(before[n], p)})
    assert all(len(c) == 1 for c in changed), changed
    order = [next(iter(c)) for c in changed]
    blocks = ["embedding", *(f"layer {i}" for i in range(model.config.num_hidden_layers)), "norm and head"]
    assert order == [b for b in blocks for _ in range(2)][:8], order  # ascending, two steps each
    adamw = create_optimizer("adamw", build_llama("tiny", 40), 1e-2)
    full = sum(2 * p.numel() * 4 for g in adamw.param_groups for p in g["params"])
    assert opt.diagnostics()["state_bytes"] < full / 2


def test_badam_finetunes_a_bert_one_encoder_layer_at_a_time_with_the_head_always(tmp_path, sentiment_csv):
    """A BERT names its layers ``encoder.layer.N.``, which the package's own block inference does not find."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from gradspace.train.encoder import model_source

    out = tmp_path / "run"
    argv = ["finetune", "--task", sentiment_csv, "--method", "badam", "--steps", "4", "--lr", "1e-3", "--out", out]
    argv += ["--optim-args", "switch_block_every=2", "--warmup", "0", "--batch-size", "8", "--max-length", "16"]
    assert run(*argv) == 0
    base = AutoModelForSequenceClassification.from_pretrained(model_source("minilm")[0], num_labels=2).state_dict()
    tuned = load_file(out / "model" / "model.safetensors")
    changed = {n for n, w in tuned.items() if n in base and not torch.equal(w, base[n])}
    layers = {n.split(".")[3] for n in changed if ".encoder.layer." in n}
    assert layers == {"0", "1"}, layers  # steps 1-2 train layer 0, steps 3-4 layer 1
    assert any(n.startswith("bert.pooler.") for n in changed) and "classifier.weight" in tuned
    assert not any("embeddings" in n for n in changed)


def test_lowrank_factorises_and_exports_the_product(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--steps", "2", "--method", "lowrank", "--rank", "4", "--out", out) == 0
    state = final_model(out)
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.weight" not in state and state[f"{q}.lowrank_A"].shape == (4, 64)
    exported = load_file(out / "model" / "model.safetensors")
    torch.testing.assert_close(exported[f"{q}.weight"], state[f"{q}.lowrank_B"] @ state[f"{q}.lowrank_A"])


def test_factorised_gpt2_conv1d_keeps_its_layout():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(6, 10)  # 10 inputs -> 6 outputs, weight stored (10, 6)
    f = Factorised(conv, 3, 1.0)
    x = torch.randn(2, 10)
    assert f.product().shape == conv.weight.shape
    torch.testing.assert_close(f(x), x @ f.product() + conv.bias)


def test_adamw8bit_is_full_rank_adamw_with_the_8bit_rule(tmp_path):
    assert run("pretrain", *SMALL, "--method", "adamw8bit", "--out", tmp_path / "a") == 0
    assert run("pretrain", *SMALL, "--method", "adamw", "--base", "adamw8bit", "--out", tmp_path / "b") == 0
    assert curve(tmp_path / "a") == curve(tmp_path / "b")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["pretrain", "--method", "lora", "--layerwise", "--grad-clip", "0"], ["--layerwise", "lora"]),
        (["pretrain", "--method", "badam", "--rank", "8"], ["does not apply", "badam"]),
        (["pretrain", "--method", "badam", "--base", "lion"], ["badam", "--base lion"]),
        (["pretrain", "--method", "adamw8bit", "--base", "lion"], ["adamw8bit", "--base lion"]),
        (["pretrain", "--method", "relora", "--optim-args", "prune=1.5"], ["relora", "prune"]),
        (["pretrain", "--method", "badam", "--optim-args", "switch_mode=sideways"], ["switch_mode"]),
        (["pretrain", "--method", "lora", "--dtype", "int8"], ["int8", "lora"]),
        (["pretrain", "--method", "lora", "--update-gap", "5"], ["update-gap", "lora"]),
        (["pretrain", "--method", "lora", "--optim-args", "alpha=8,lora_alpha=4"], ["alpha", "lora_alpha", "both"]),
    ],
)
def test_bad_baseline_options_are_one_line_errors(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    assert_clean_error(capsys, run(*argv, *SMALL, "--out", out), *words)
    assert not out.exists()


def test_lowrank_is_refused_for_finetuning(tmp_path, capsys, sentiment_csv):
    code = run("finetune", "--task", sentiment_csv, "--method", "lowrank", "--out", tmp_path / "o", "--threads", "1")
    assert_clean_error(capsys, code, "lowrank", "pretraining")


def test_compare_runs_baselines_beside_subspace_methods(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "galore,lora:rank=4;alpha=8,badam:switch_block_every=2", *SMALL, "--out", out]
    assert run(*argv) == 0
    report = (out / "report.md").read_text()
    for label in ("galore", "lora", "badam"):
        assert label in report
    summaries = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/summary.json")}
    lora = next(s for name, s in summaries.items() if name.startswith("lora"))
    assert lora["rank"] == 4


def test_a_full_finetune_exports_as_a_lora_adapter(tmp_path, sentiment_csv, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gradspace.train.encoder import model_source

    out = tmp_path / "run"
    argv = ["finetune", "--task", sentiment_csv, "--method", "galore", "--steps", "3", "--lr", "1e-3", "--out", out]
    assert run(*argv, "--batch-size", "8", "--max-length", "16", "--threads", "1", "--update-gap", "2") == 0
    tok = AutoTokenizer.from_pretrained(out / "model")
    batch = tok(["the movie was superb", "the plot was dull"], return_tensors="pt", padding=True)
    trained = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()

    def adapted():
        base = AutoModelForSequenceClassification.from_pretrained(model_source("minilm")[0], num_labels=2)
        return PeftModel.from_pretrained(base, out / "adapter").eval()

    capsys.readouterr()
    assert run("export", out, "--lora-rank", "384", "--overwrite") == 0  # full rank: the change exactly
    assert "LoRA adapter of 36 weights" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(adapted()(**batch).logits, trained(**batch).logits, rtol=1e-4, atol=1e-4)
    assert run("export", out, "--lora-rank", "auto", "--lora-energy", "0.5", "--overwrite") == 0
    report = json.loads((out / "adapter" / "gradspace.json").read_text())
    ranks = [w["rank"] for w in report["weights"].values()]
    assert all(w["energy_kept"] >= 0.5 for w in report["weights"].values()) and max(ranks) < 384
    assert "classifier" in report["full_modules"]
    with torch.no_grad():
        assert adapted()(**batch).logits.shape == (2, 2)


def test_low_rank_change_keeps_the_stated_energy():
    from gradspace.train.lora_export import low_rank_change

    torch.manual_seed(0)
    u = torch.linalg.qr(torch.randn(20, 20)).Q
    v = torch.linalg.qr(torch.randn(12, 12)).Q
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, *[0.1] * 8])
    delta = u[:, :12] * s @ v.T
    b, a, kept = low_rank_change(delta, None, 0.9)
    share = (s**2).cumsum(0) / (s**2).sum()
    assert a.shape[0] == int((share < 0.9).sum()) + 1 == 2 and kept == pytest.approx(float(share[1]))
    b, a, kept = low_rank_change(delta, 12, 0.9)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-5)


def test_lora_export_of_a_preset_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--steps", "2", "--out", out) == 0
    capsys.readouterr()
    assert_clean_error(capsys, run("export", out, "--lora-rank", "8", "--overwrite"), "from scratch")
    assert_clean_error(capsys, run("export", out, "--lora-rank", "zero"), "--lora-rank")
