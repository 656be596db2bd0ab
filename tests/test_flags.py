"""The command line takes a Hugging Face user's spellings (qlora_ext.train.flags): underscores, `--flag true`,
TrainingArguments' and qlora.py's names for the same settings; what it cannot take is a usage error naming it."""
import pytest

from qlora_ext.train import cli
from qlora_ext.train.cli import _explicit_flags, _train_parser
from qlora_ext.train.config import HF_ALIASES, TrainConfig, _flag


def parse(argv):
    return _train_parser("qlora-train").parse_args(argv)


@pytest.mark.parametrize("argv, expected", [
    ([], TrainConfig.gradient_checkpointing),
    (["--gradient-checkpointing"], True),
    (["--no-gradient-checkpointing"], False),
    (["--gradient-checkpointing", "False"], False),
    (["--gradient-checkpointing", "true"], True),
    (["--gradient_checkpointing", "0"], False),
    (["--gradient-checkpointing=no"], False),
    (["--gradient_checkpointing=YES"], True),
])
def test_boolean_flags_take_hf_values(argv, expected):
    assert parse(argv).gradient_checkpointing is expected


def test_a_boolean_flag_without_value_does_not_take_the_next_flag():
    a = parse(["--resume", "--steps", "7", "--no-progress"])
    assert a.resume is True and a.steps == 7 and a.progress is False


@pytest.mark.parametrize("argv, message", [
    (["--resume", "maybe"], "argument --resume: expected true or false (or no value), got 'maybe'"),
    (["--no-resume", "true"], "argument --no-resume: takes no value (got 'true')"),
    (["--no_resume=false"], "argument --no-resume: takes no value (got 'false')"),
])
def test_bad_boolean_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_underscore_spellings_are_the_same_flags():
    a = parse(["--output_dir", "runs/x", "--seq_len=64", "--warmup_steps", "3", "--eval_data", "a_b.txt"])
    assert (a.output_dir, a.seq_len, a.warmup_steps, a.eval_data) == ("runs/x", 64, 3, ["a_b.txt"])


def test_values_are_never_respelled():
    # a value that looks like an underscore flag stays as typed (only option names are respelled)
    a = parse(["--data", "my_data.txt", "--output-dir", "runs/my_run", "--target-modules", "q_proj,v_proj"])
    assert a.data == ["my_data.txt"] and a.output_dir == "runs/my_run" and a.target_modules == ["q_proj", "v_proj"]


def test_hf_and_qlora_py_names_set_the_same_fields():
    argv = ["--model_name_or_path", "m", "--learning_rate", "1e-4", "--max_steps", "12",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3", "--eval_steps", "4",
            "--save_steps", "6", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.1",
            "--double_quant", "False", "--quant_type", "fp4"]
    given = _explicit_flags(_train_parser("qlora-train"), argv)
    assert given == {"model": "m", "lr": 1e-4, "steps": 12, "batch_size": 2, "grad_accum": 3, "eval_every": 4,
                     "save_every": 6, "r": 8, "alpha": 16.0, "dropout": 0.1, "double_quant": False,
                     "quant_type": "fp4"}
    assert _explicit_flags(_train_parser("qlora-train"), ["--num_train_epochs", "1.5"]) == {"epochs": 1.5}
    assert set(HF_ALIASES) <= {f for f in TrainConfig.__dataclass_fields__}


def test_an_alias_and_its_flag_count_as_one_setting_given_twice(tmp_path, capsys):
    # --max-steps is --steps: with --epochs it is the same conflict as --steps with --epochs
    assert cli.main(["--max_steps", "5", "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 2
    assert "give --steps or --epochs, not both" in capsys.readouterr().err


def test_help_shows_both_spellings_and_the_boolean_form():
    text = _train_parser("qlora-train").format_help()
    assert "--lr LR, --learning-rate LR" in text
    assert "--resume [true|false], --no-resume\n" in text
    for name, alias in HF_ALIASES.items():
        assert f"{_flag(name)} " in text and f"{alias} " in text


@pytest.mark.parametrize("command, argv, message", [
    ("quantize", ["--to", "x", "--double_quant", "maybe"], "argument --double-quant: expected true or false"),
    ("study", ["--progress", "perhaps"], "argument --progress: expected true or false"),
    ("eval", ["--output-dir", "x", "--seq_le", "5"], "did you mean: --seq_le -> --seq-len?"),
    ("generate", ["--output_dir", "x", "--max_new_tokens", "0"], "--max-new-tokens must be positive"),
])
def test_subcommands_take_the_same_spellings(command, argv, message, capsys):
    try:
        code = cli.main([command, *argv])   # (a ConfigError: the exit status, argparse's: SystemExit)
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_flags_are_spelled_out(capsys):
    # argparse's prefix matching would make --num mean --num-proc until another flag starts alike
    with pytest.raises(SystemExit):
        parse(["--num", "2"])
    assert "unrecognized arguments: --num 2" in capsys.readouterr().err
    assert parse(["--num-proc", "2"]).num_proc == 2
