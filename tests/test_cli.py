"""The CLI end to end on a tiny random OLMoE saved as a local model directory.

analyze -> select -> train (expert-only, with weight decay) -> evaluate (with steering), and the
one-line error contract: a user mistake exits 2 with ``error: ...`` and no traceback.
"""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from moe_core.cli import main
from tests.test_analysis import _items
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("olmoe", seed=1), tiny_tokenizer()


@pytest.fixture
def model_dir(tmp_path, tiny):
    """The tiny model saved as a local model directory, as a user would point the CLI at one."""
    model, tok = tiny
    path = tmp_path / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_analyze_and_select_on_a_local_model_dir(tmp_path, model_dir, capsys):
    safe = tmp_path / "safe.csv"
    unsafe = tmp_path / "unsafe.jsonl"
    pd.DataFrame({"goal": [i.text for i in _items("safe", 4)]}).to_csv(safe, index=False)
    unsafe.write_text("".join(json.dumps({"prompt": i.text}) + "\n" for i in _items("unsafe", 4)))
    root = tmp_path / "runs"
    rc = main(
        [
            "--runs-root",
            str(root),
            "analyze",
            "--model",
            str(model_dir),
            "--safe",
            str(safe),
            "--unsafe",
            str(unsafe),
            "--batch-size",
            "4",
            "--scope",
            "prompt",
            "--max-new-tokens",
            "2",
            "--name",
            "cli",
        ]
    )
    assert rc == 0
    (run_dir,) = list(root.iterdir())
    assert (run_dir / "risk" / "aggregated.parquet").exists()
    rc = main(
        ["select", "--run", run_dir.name, "--method", "top_n", "--n", "3", "--runs-root", str(root)]
    )  # after the command too
    assert rc == 0
    mask = json.loads((run_dir / "masks" / "unsafe_experts.json").read_text())
    assert sum(len(v) for v in mask["experts"].values()) == 3
    assert "L" in capsys.readouterr().out
    assert main(["runs", "--runs-root", str(root)]) == 0 and run_dir.name in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    rc = main(
        [
            "--runs-root",
            str(tmp_path),
            "analyze",
            "--safe",
            str(tmp_path / "missing.csv"),
            "--unsafe",
            str(tmp_path / "x.csv"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    rc = main(["--runs-root", str(tmp_path), "select", "--run", "nope"])
    assert rc == 2 and "no run at nope" in capsys.readouterr().err


def _weights(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_cli_train_and_evaluate_update_only_the_chosen_experts(tmp_path, model_dir, capsys):
    root = tmp_path / "runs"
    common = ["--runs-root", str(root)]
    assert (
        main(
            common
            + [
                "analyze",
                "--model",
                str(model_dir),
                "--demo-sets",
                "--batch-size",
                "8",
                "--max-batches",
                "2",
                "--scope",
                "generated",
                "--max-new-tokens",
                "4",
                "--name",
                "t",
            ]
        )
        == 0
    )
    (run_dir,) = list(root.iterdir())
    assert main(common + ["select", "--run", run_dir.name, "--method", "top_n", "--n", "2"]) == 0
    mask = json.loads((run_dir / "masks" / "unsafe_experts.json").read_text())
    chosen = {(int(l), e) for l, es in mask["experts"].items() for e in es}
    assert (
        main(
            common
            + ["train", "--run", run_dir.name, "--epochs", "1", "--lr", "1e-2", "--weight-decay", "0.1"]
        )
        == 0
    )
    merged = run_dir / "train" / "experts-unsafe_experts" / "merged_model"
    before, after = _weights(model_dir), _weights(merged)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # only per-expert weights of the chosen (layer, expert) pairs moved; everything else is bit-identical
    assert changed, "training changed nothing"
    for k in changed:
        assert ".experts." in k, k
        layer = int(k.split(".layers.")[1].split(".")[0])
        expert = int(k.split(".experts.")[1].split(".")[0])
        assert (layer, expert) in chosen, k
    # the compact delta alone turns the base model into the trained one
    delta = run_dir / "train" / "experts-unsafe_experts" / "expert_delta.safetensors"
    assert (
        main(
            [
                "apply-delta",
                "--base",
                str(model_dir),
                "--delta",
                str(delta),
                "--out",
                str(tmp_path / "applied"),
            ]
        )
        == 0
    )
    applied = _weights(tmp_path / "applied")
    assert all(torch.equal(applied[k], after[k]) for k in after)
    assert (
        main(
            common
            + [
                "evaluate",
                "--run",
                run_dir.name,
                "--eval-limit",
                "3",
                "--eval-max-new-tokens",
                "4",
                "--steer-mask",
                "unsafe_experts",
                "--shift",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "base" in out and "experts-unsafe_experts" in out and "steer-off-unsafe_experts" in out
    assert (run_dir / "eval" / "comparison_summary.parquet").exists()
    shift = pd.read_parquet(run_dir / "eval" / "shift_experts-unsafe_experts.parquet")
    assert {"risk_diff_before", "risk_diff_after", "delta"} <= set(shift.columns) and len(shift) == 2 * 8


def test_a_stop_request_ends_the_demo_at_that_stage(tmp_path, model_dir, capsys):
    """The app's "Stop" on a running demo stage stops the whole demo, not just that stage."""
    from moe_core.store.run import Run

    root = tmp_path / "runs"
    common = ["--runs-root", str(root)]
    assert (
        main(
            common
            + [
                "analyze",
                "--model",
                str(model_dir),
                "--demo-sets",
                "--batch-size",
                "8",
                "--max-batches",
                "1",
                "--max-new-tokens",
                "2",
                "--name",
                "d",
            ]
        )
        == 0
    )
    (run_dir,) = list(root.iterdir())
    run = Run.open(run_dir)
    run.job("demo-train-experts").request_stop()  # as the page does while that stage runs
    assert (
        main(
            common
            + [
                "demo",
                "--run",
                str(run_dir),
                "--model",
                str(model_dir),
                "--max-batches",
                "1",
                "--batch-size",
                "8",
                "--max-new-tokens",
                "2",
                "--n",
                "2",
                "--epochs",
                "1",
                "--job",
                "demo",
            ]
        )
        == 0
    )
    run.reload()
    assert run.status()["train:experts-unsafe_experts"] == "stopped"
    assert "train:random_experts" not in run.status() and "evaluation:comparison" not in run.status()
    assert (run.job("demo-train-experts").read_status() or {}).get("state") == "stopped"
    assert "training experts-unsafe_experts stopped" in capsys.readouterr().out


# Qwen3-style: with enable_thinking off, the assistant turn opens with a marker, in the generation prompt and in a
# finished conversation alike (so the SFT prompt stays a prefix of the full text)
QUIET = "{% set off = enable_thinking is defined and not enable_thinking %}"
QUIET_TEMPLATE = QUIET + (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and off %}quiet {% endif %}"
    "{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% if off %}quiet {% endif %}{% endif %}"
)


def test_chat_template_options_reach_analysis_training_and_evaluation(tmp_path, tiny, monkeypatch, capsys):
    """``--chat-template-kwargs`` (e.g. Qwen3's enable_thinking=false) and ``--system-prompt`` are recorded with the
    run's analysis settings and every later step renders its prompts with them; a resume without them, or a value
    that is no JSON object, is refused in one line."""
    from moe_core.model import generation

    model, tok = tiny
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.chat_template = QUIET_TEMPLATE
    tok.save_pretrained(model_dir)
    tok.chat_template = tiny_tokenizer().chat_template
    rendered: list[str] = []
    real = generation.render_chat
    spy = lambda *a, **k: rendered.append(real(*a, **k)) or rendered[-1]  # noqa: E731
    for module in [m for name, m in sys.modules.items() if name.startswith("moe_core.")]:
        if getattr(module, "render_chat", None) is real:  # every module that renders chats
            monkeypatch.setattr(module, "render_chat", spy)
    root = tmp_path / "runs"
    common = ["--runs-root", str(root)]
    analyze = common + [
        "analyze",
        "--model",
        str(model_dir),
        "--demo-sets",
        "--batch-size",
        "8",
        "--max-batches",
        "2",
        "--scope",
        "generated",
        "--max-new-tokens",
        "3",
    ]
    assert main(analyze + ["--name", "plain"]) == 0
    assert rendered and not any("quiet" in r for r in rendered)  # the control: without the option, no marker
    rendered.clear()
    assert (
        main(
            analyze
            + [
                "--name",
                "quiet",
                "--chat-template-kwargs",
                '{"enable_thinking": false}',
                "--system-prompt",
                "Be brief.",
            ]
        )
        == 0
    )
    run_dir = next(p for p in root.iterdir() if p.name.endswith("quiet"))
    for phase in ("analysis", "train", "evaluate"):
        if phase == "train":
            assert main(common + ["select", "--run", run_dir.name, "--n", "2"]) == 0
            assert main(common + ["train", "--run", run_dir.name, "--epochs", "1"]) == 0
        elif phase == "evaluate":
            assert (
                main(
                    common
                    + ["evaluate", "--run", run_dir.name, "--eval-limit", "2", "--eval-max-new-tokens", "2"]
                )
                == 0
            )
        assert rendered and all(
            "<|assistant|>quiet " in r and r.startswith("<|system|>Be brief.") for r in rendered
        ), (phase, rendered[:2])
        rendered.clear()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["steps"]["analysis"]["config"]["chat_template_kwargs"] == {"enable_thinking": False}
    settings = json.loads((run_dir / "eval" / "comparison.json").read_text())["settings"]
    assert (
        settings["chat_template_kwargs"] == {"enable_thinking": False}
        and settings["system_prompt"] == "Be brief."
    )
    capsys.readouterr()
    assert main(common + ["analyze", "--run", run_dir.name]) == 2  # a resume must render prompts the same way
    assert "chat_template_kwargs" in capsys.readouterr().err
    assert main(analyze + ["--chat-template-kwargs", "[1]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --chat-template-kwargs") and "JSON object" in err and "Traceback" not in err


def test_hugging_face_training_arguments_reach_the_trainer_and_locked_ones_say_why(
    tmp_path, model_dir, capsys
):
    """Issue 18: every open TrainingArguments field is a flag of `train` (our defaults otherwise), --lr and
    --epochs keep working beside --learning-rate / --num-train-epochs, and what would break the method is
    refused in one line naming why."""
    root = tmp_path / "runs"
    common = ["--runs-root", str(root)]
    analyze = ["analyze", "--model", str(model_dir), "--demo-sets", "--batch-size", "8", "--max-batches", "2"]
    assert main(common + analyze + ["--max-new-tokens", "2", "--name", "hf"]) == 0
    (run_dir,) = list(root.iterdir())
    assert main(common + ["select", "--run", run_dir.name, "--n", "2", "--toggles", "0:0"]) == 0
    mask = json.loads((run_dir / "masks" / "unsafe_experts.json").read_text())
    assert mask["meta"]["hand_toggled"] == ["0:0"]
    train = common + ["train", "--run", run_dir.name, "--checkpoint-every", "100"]
    flags = ["--learning-rate", "0.002", "--num-train-epochs", "1", "--max_grad_norm", "0.25"]
    flags += ["--lr_scheduler_type", "linear", "--training-args", '{"adam_beta2": 0.95}', "--name", "hf"]
    assert main(train + flags) == 0
    args = json.loads((run_dir / "train" / "hf" / "training_metadata.json").read_text())["args"]
    assert args["learning_rate"] == 0.002 and args["num_train_epochs"] == 1
    assert (
        args["max_grad_norm"] == 0.25 and args["lr_scheduler_type"] == "linear" and args["adam_beta2"] == 0.95
    )
    assert args["logging_steps"] == 1 and args["report_to"] == []  # our defaults where not given
    assert main(train + ["--lr", "0.003", "--epochs", "1", "--name", "old-flags"]) == 0
    args = json.loads((run_dir / "train" / "old-flags" / "training_metadata.json").read_text())["args"]
    assert args["learning_rate"] == 0.003 and args["lr_scheduler_type"] == "constant"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(train + ["--gradient_accumulation_steps", "4"])
    assert e.value.code == 2 and "merge several analysis batches" in capsys.readouterr().err
    assert main(train + ["--training-args", '{"per_device_train_batch_size": 4}', "--name", "x"]) == 2
    assert "fixed by the method" in capsys.readouterr().err
    assert main(train + ["--training-args", '{"no_such_argument": 1}', "--name", "x"]) == 2
    assert "unknown training argument" in capsys.readouterr().err
    assert not (run_dir / "train" / "x").exists()
