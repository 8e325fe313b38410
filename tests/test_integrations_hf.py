"""Hugging Face Trainer and Accelerate: gradspace optimizers configured from TrainingArguments, checkpoints
that load with weights_only=True and resume exactly, layer-wise mode with the Trainer's accumulation."""

import copy
import io
import logging

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from conftest import batches, make_model, train
from gradspace import SubspaceOptimizer, create_optimizer
from gradspace.integrations.hf import GradspaceTrainer, create_hf_optimizer, parse_optim_args
from gradspace.layerwise import Layerwise
from gradspace.methods import METHODS
from gradspace.rules import RULES

CONFIG = LlamaConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
PROJECTED = "model.layers.0.self_attn.q_proj.weight"
THREE = ["up", "mid", "down"]  # the linear weights of conftest's model, projected in the Accelerate tests


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, seq_len=16):
        self.x = torch.randint(0, CONFIG.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG)


def hf_args(out, **kw):
    kw = {
        "max_steps": 8,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.01,
        "save_strategy": "steps",
        "save_steps": 4,
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "logging_steps": 1,
        "optim_target_modules": ["attn", "mlp"],
        "optim_args": "rank=4,update_proj_gap=3",
        **kw,
    }
    return TrainingArguments(str(out), **kw)


def fit(out, method, resume=None, layerwise=False, callbacks=None, **kw):
    """Train a fresh tiny LLaMA (same init every time) with the Trainer: final parameters and the trainer."""
    model = tiny_llama()
    args = hf_args(out, **kw)
    opt = create_hf_optimizer(model, args, method, layerwise=layerwise)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return [p.detach().clone() for p in model.parameters()], trainer


def attn_mlp_weights(model):
    return {n for n, p in model.named_parameters() if p.dim() == 2 and ("attn" in n or "mlp" in n)}


def galore(model):
    return create_optimizer("galore", model, lr=1e-2, rank=4, update_proj_gap=3, target_modules=THREE)


def max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state; each test starts from none, as a new process would."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ------------------------------------------------------------------------- checkpoints load with weights_only
@pytest.mark.parametrize("base", list(RULES))
@pytest.mark.parametrize("method", list(METHODS))
def test_state_dict_loads_weights_only_and_resumes_exactly(method, base):
    data = batches(11)
    kw = {} if METHODS[method] is None else {"rank": 4, "update_proj_gap": 3, "target_modules": THREE}
    model = make_model()
    opt = create_optimizer(method, model, lr=1e-2, base=base, weight_decay=0.01, **kw)
    train(model, opt, data[:7])  # subspace updates at steps 3 and 6 (OSD moves its basis every step instead)
    if METHODS[method] is not None and not method.startswith("osd"):
        assert opt.state[model.up.weight]["updates"] >= 2
    saved = roundtrip(opt.state_dict())  # raises if anything in it is not allowed under weights_only=True
    assert "gradspace" in saved

    resumed = copy.deepcopy(model)
    opt2 = create_optimizer(method, resumed, lr=1e-2, base=base, weight_decay=0.01, **kw)
    opt2.load_state_dict(saved)
    train(model, opt, data[7:])
    train(resumed, opt2, data[7:])
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), model.parameters()))


# --------------------------------------------------------------------- configuration from TrainingArguments
def test_parse_optim_args_types_values():
    assert parse_optim_args("rank=8, scale=0.25,proj_type=left,accumulate=false,r_max=none") == {
        "rank": 8,
        "scale": 0.25,
        "proj_type": "left",
        "accumulate": False,
        "r_max": None,
    }
    assert parse_optim_args({"rank": 8}) == {"rank": 8}
    assert parse_optim_args(None) == parse_optim_args("") == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_optim_args("rank8")


def test_optimizer_takes_the_trainer_settings(tmp_path):
    model = tiny_llama()
    args = hf_args(
        tmp_path,
        learning_rate=3e-3,
        weight_decay=0.1,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-7,
        seed=5,
        optim_args="rank=4,update_proj_gap=3,scale=0.5",
    )
    opt = create_hf_optimizer(model, args, "subtrack", optim_args={"scale": 0.75}, eta=0.5)
    assert isinstance(opt, SubspaceOptimizer) and opt.seed == 5
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    proj = by_name[PROJECTED]
    assert (proj["rank"], proj["update_proj_gap"], proj["scale"], proj["eta"]) == (4, 3, 0.75, 0.5)
    assert proj["tracker"] == "subtrack" and proj["weight_decay"] == 0.1
    assert (proj["lr"], proj["betas"], proj["eps"]) == (3e-3, (0.8, 0.95), 1e-7)
    # the Trainer's decay split: no decay on norms; embeddings and the head stay in full rank, decayed
    assert "rank" not in by_name["model.norm.weight"] and by_name["model.norm.weight"]["weight_decay"] == 0.0
    assert "rank" not in by_name["lm_head.weight"] and by_name["lm_head.weight"]["weight_decay"] == 0.1
    projected = {n for n, g in by_name.items() if "rank" in g}
    assert projected == attn_mlp_weights(model)

    lion = create_hf_optimizer(model, args, "galore", base="lion", target_modules="all-linear", beta2=0.98)
    lion_proj = next(g for g in lion.param_groups if "rank" in g)
    assert lion_proj["betas"] == (0.8, 0.98) and "eps" not in lion_proj
    with pytest.raises(ValueError, match="unknown method"):
        create_hf_optimizer(model, args, "galora")
    with pytest.raises(ValueError, match="full rank"):  # rank in optim_args does not apply to AdamW
        create_hf_optimizer(model, args, "adamw")


# ----------------------------------------------------------------------------- Trainer: resume, layer-wise
@pytest.mark.parametrize("method", ["galore", "subtrack", "grasswalk"])
def test_trainer_resume_matches_uninterrupted_run(tmp_path, method):
    # 8 steps with subspace updates at steps 0, 3, 6; the checkpoint at step 4 lies between two updates
    expected, _ = fit(tmp_path, method)
    ckpt = tmp_path / "checkpoint-4"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert saved["gradspace"]["seed"] == 0 and saved["state"]
    assert (ckpt / "model.safetensors").exists()
    resumed, trainer = fit(tmp_path / "again", method, resume=str(ckpt))
    assert trainer.state.global_step == 8
    # bit-identical: the Trainer restores data order and RNG states, gradspace basis, moments, tracker state
    assert max_diff(resumed, expected) == 0.0


class GradsHeld(TrainerCallback):
    """Counts the gradients still held after each micro-batch and at each optimizer step."""

    def __init__(self):
        self.substep, self.at_step = [], []

    def on_substep_end(self, args, state, control, model=None, **kw):
        self.substep.append(sum(p.grad is not None for p in model.parameters()))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.at_step.append(sum(p.grad is not None for p in model.parameters()))


@pytest.mark.parametrize("method", ["galore", "subtrack"])
def test_trainer_layerwise_with_accumulation_matches_normal_mode_and_resumes(tmp_path, method):
    normal, _ = fit(tmp_path / "normal", method, gradient_accumulation_steps=2, max_grad_norm=0.0)
    held = GradsHeld()
    got, trainer = fit(
        tmp_path / "lw", method, layerwise=True, callbacks=[held], gradient_accumulation_steps=2, max_grad_norm=0.0
    )
    assert trainer.state.global_step == 8
    # the micro-batch sums S^T G1 + S^T G2 and S^T (G1 + G2) differ by float32 rounding only
    assert max_diff(got, normal) < 1e-6
    assert held.at_step == [0] * 8  # every weight stepped inside backward; the Trainer's step() finds none
    n_params = len(list(trainer.model.parameters()))
    n_projected = len(attn_mlp_weights(trainer.model))
    assert held.substep[0] == n_params  # first window: no basis yet, everything accumulates in full
    # later windows: GaLore accumulates S^T G for its projected weights; SubTrack needs every full gradient
    assert held.substep[1] == n_params - (n_projected if method == "galore" else 0)

    resumed, _ = fit(
        tmp_path / "lw2",
        method,
        layerwise=True,
        resume=str(tmp_path / "lw" / "checkpoint-4"),
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,
    )
    assert max_diff(resumed, got) == 0.0


def test_trainer_layerwise_follows_a_short_last_window(tmp_path):
    # 48 samples / batch 4 = 12 micro-batches per epoch; accumulating 5 leaves a last window of 2 per epoch
    normal, _ = fit(
        tmp_path / "n", "galore", gradient_accumulation_steps=5, max_grad_norm=0.0, max_steps=6, save_strategy="no"
    )
    got, trainer = fit(
        tmp_path / "l",
        "galore",
        layerwise=True,
        gradient_accumulation_steps=5,
        max_grad_norm=0.0,
        max_steps=6,
        save_strategy="no",
    )
    assert trainer.state.epoch == 2.0
    assert max_diff(got, normal) < 1e-6


def test_layerwise_warns_that_clipping_cannot_apply(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gradspace.integrations.hf"):
        opt = create_hf_optimizer(tiny_llama(), hf_args(tmp_path, max_grad_norm=1.0), "galore", layerwise=True)
    assert "max_grad_norm" in caplog.text
    assert isinstance(opt.layerwise, Layerwise)
    opt.layerwise.remove()


def test_gradspace_trainer_builds_the_same_optimizer(tmp_path):
    expected, _ = fit(tmp_path / "a", "galore", max_steps=4, save_strategy="no")
    args = hf_args(tmp_path / "b", max_steps=4, save_strategy="no")
    trainer = GradspaceTrainer(model_init=tiny_llama, args=args, train_dataset=Tokens(), method="galore")
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, SubspaceOptimizer)
    assert max_diff([p.detach() for p in trainer.model.parameters()], expected) == 0.0


# ----------------------------------------------------------------------------- Accelerate
def test_accelerate_prepare_wraps_our_optimizer():
    data = batches(12)
    ref = make_model()
    ref_opt = galore(ref)
    for i, (x, y) in enumerate(data):
        (nn.functional.mse_loss(ref(x), y) / 2).backward()
        if i % 2 == 1:
            ref_opt.step()
            ref_opt.zero_grad()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = make_model()
    opt = galore(model)
    model, prepared = accelerator.prepare(model, opt)
    assert isinstance(prepared, AcceleratedOptimizer) and prepared.optimizer is opt
    for x, y in data:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))  # accumulate() divides by 2
            prepared.step()  # skipped by Accelerate inside a window
            prepared.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert opt.state[model.up.weight]["step"] == 6

    fresh = galore(make_model())
    fresh = accelerator.prepare(fresh)
    fresh.load_state_dict(roundtrip(prepared.state_dict()))
    assert torch.equal(
        fresh.optimizer.state[fresh.param_groups[0]["params"][0]]["basis"], opt.state[model.up.weight]["basis"]
    )


def test_accelerate_layerwise_follows_accumulate():
    data = batches(12)
    ref = make_model()
    ref_opt = galore(ref)
    for i, (x, y) in enumerate(data):
        (nn.functional.mse_loss(ref(x), y) / 3).backward()
        if i % 3 == 2:
            ref_opt.step()
            ref_opt.zero_grad()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = make_model()
    opt = galore(model)
    model, prepared = accelerator.prepare(model, opt)
    Layerwise(opt, sync=lambda: accelerator.sync_gradients)
    for x, y in data:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            prepared.step()
            prepared.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state[model.up.weight]["step"] == 4


# ----------------------------------------------------------------------------- args.optim is honoured
def test_the_trainers_optimizer_names_map_to_presets_and_others_are_errors():
    from gradspace.integrations.hf import resolve_trainer_optim

    assert resolve_trainer_optim("galore_adamw_8bit_layerwise", None, False, {"rank": 8}) == (
        "galore",
        True,
        {"base": "adamw8bit", "rank": 8},
    )
    assert resolve_trainer_optim("galore_adafactor", None, False, {})[2]["base"] == "adafactor"
    assert resolve_trainer_optim("adamw_torch", "subtrack++", False, {}) == ("subtrack++", False, {})
    assert resolve_trainer_optim("adamw_torch", None, False, {})[0] is None  # optim_args' method=, else GaLore
    assert resolve_trainer_optim("apollo_adamw_layerwise", None, False, {}) == ("apollo", True, {"base": "adamw"})
    for optim, words in (("lion_32bit", "cannot be honoured"), ("galore_adamw", "keep one")):
        with pytest.raises(ValueError, match=words):
            resolve_trainer_optim(optim, "subtrack" if optim == "galore_adamw" else None, False, {})


def projected(trainer):
    return next(g for g in trainer.optimizer.optimizer.param_groups if "rank" in g)


def test_the_trainers_apollo_names_and_options_build_apollo(tmp_path):
    args = hf_args(
        tmp_path, max_steps=2, save_strategy="no", optim="apollo_adamw", optim_args="rank=1,proj=random,scale=128"
    )
    trainer = GradspaceTrainer(model_init=tiny_llama, args=args, train_dataset=Tokens())
    trainer.train()
    group = projected(trainer)
    assert (group["tracker"], group["output"], group["rank"], group["scale"]) == ("gaussian", "scale", 1, 128)
    assert group["scale_type"] == "channel"  # the Trainer's default for apollo_adamw
    args = hf_args(tmp_path, optim="apollo_adamw", optim_args="rank=4,proj=gaussian")
    with pytest.raises(ValueError, match="proj=random"):
        create_hf_optimizer(tiny_llama(), args, "apollo")


def test_optim_gradspace_takes_the_method_from_optim_args(tmp_path):
    from gradspace.integrations.hf import GradspaceTrainingArguments

    kw = {"max_steps": 2, "per_device_train_batch_size": 4, "report_to": "none", "use_cpu": True}
    args = GradspaceTrainingArguments(
        str(tmp_path), optim="gradspace", optim_args="method=subtrack++,rank=4,eta=0.5", save_strategy="no", **kw
    )
    assert args.optim == "gradspace" and "gradspace" in args.to_json_string()
    trainer = GradspaceTrainer(model_init=tiny_llama, args=args, train_dataset=Tokens())
    trainer.train()
    group = projected(trainer)
    assert (group["tracker"], group["moments"], group["recovery"], group["eta"]) == ("subtrack", "project", True, 0.5)
    with pytest.raises(ValueError, match="keep one"):
        create_hf_optimizer(tiny_llama(), args, "galore")
    with pytest.raises(ValueError, match="unknown method"):
        create_hf_optimizer(tiny_llama(), hf_args(tmp_path, optim_args="method=galor"))
    with pytest.raises(ValueError, match="not a valid OptimizerNames"):  # the Trainer's own class refuses it
        TrainingArguments(str(tmp_path), optim="gradspace", **kw)


def test_one_eps_default_whichever_entry_point(tmp_path):
    """The Trainer's adam_epsilon default (1e-8) is not a choice: gradspace's eps (galore-torch's 1e-6) holds,
    as with create_optimizer and the CLI; a value the user sets is honoured."""
    model = tiny_llama()
    library = create_optimizer("galore", model, target_modules=["attn", "mlp"]).param_groups[0]["eps"]
    trainer_default = create_hf_optimizer(model, hf_args(tmp_path)).param_groups[0]["eps"]
    assert library == trainer_default == 1e-6
    assert create_hf_optimizer(model, hf_args(tmp_path, adam_epsilon=1e-7)).param_groups[0]["eps"] == 1e-7
    args = hf_args(tmp_path, optim_args="rank=4,eps=1e-8")
    assert create_hf_optimizer(model, args).param_groups[0]["eps"] == 1e-8


def test_gradspace_trainer_honours_args_optim(tmp_path):
    args = hf_args(tmp_path, max_steps=2, save_strategy="no", optim="galore_adamw_8bit")
    trainer = GradspaceTrainer(model_init=tiny_llama, args=args, train_dataset=Tokens())
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, SubspaceOptimizer)
    assert {g["base"] for g in opt.param_groups} == {"adamw8bit"} and any("rank" in g for g in opt.param_groups)


def test_pytorch_optimizers_argument_order_gets_a_message():
    with pytest.raises(TypeError, match="the method name comes first"):
        create_optimizer(tiny_llama(), "galore")


def test_gradspace_trainer_under_fsdp_refuses_and_says_what_works(tmp_path):
    args = hf_args(tmp_path / "f", max_steps=2, save_strategy="no")
    trainer = GradspaceTrainer(model_init=tiny_llama, args=args, train_dataset=Tokens(), method="galore")
    trainer.is_fsdp_enabled = True  # what the Trainer sets from Accelerate's FSDP plugin
    with pytest.raises(NotImplementedError, match=r"does not run under FSDP.*DDP.*gradspace pretrain --fsdp"):
        trainer.create_optimizer()
    assert trainer.optimizer is None


@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adafactor_layerwise", "apollo_adamw"])
def test_the_trainers_galore_and_apollo_names_need_optim_target_modules_as_in_the_trainer(tmp_path, optim):
    from gradspace.integrations.hf import TRAINER_OPTIM

    assert optim in TRAINER_OPTIM
    args = hf_args(tmp_path, max_steps=1, save_strategy="no", optim=optim, optim_target_modules=None)
    trainer = GradspaceTrainer(model=tiny_llama(), args=args, train_dataset=Tokens())
    with pytest.raises(ValueError, match=r"optim_target_modules"):
        trainer.create_optimizer()
    assert trainer.optimizer is None
    named = GradspaceTrainer(model=tiny_llama(), args=args, train_dataset=Tokens(), target_modules=["q_proj"])
    projected = [g for g in named.create_optimizer().param_groups if "rank" in g]
    assert projected and all(n.endswith("q_proj.weight") for g in projected for n in g["param_names"])
    default = hf_args(tmp_path, max_steps=1, save_strategy="no", optim_target_modules=None)  # adamw_torch
    ours = GradspaceTrainer(model=tiny_llama(), args=default, train_dataset=Tokens(), method="galore")
    assert any("rank" in g for g in ours.create_optimizer().param_groups)  # gradspace's own: its defaults
