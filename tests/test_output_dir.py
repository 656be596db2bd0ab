"""--output-dir safety: a new run never lands on another run's files unless told to, never on a model's folder;
a run told to start over removes the previous run's files (so eval and merge cannot take them for its own);
paths are saved absolute; a run's own files are not data; --resume finds the newest checkpoint left."""
import json
import math
import os

import pytest
import torch

from qlora_ext.train.checkpoint import latest_checkpoint
from qlora_ext.train.cli import main as cli_main
from qlora_ext.train.config import ConfigError, TrainConfig, resume_config
from qlora_ext.train.data import find_text_files
from qlora_ext.train.output_dir import (check_output_dir, check_writable, clear_previous_run, own_paths,
                                       previous_run)
from qlora_ext.train.trainer import Trainer, train
from tests.test_train import _cfg, tiny  # noqa: F401  (the tiny model fixture)


def _fake_checkpoint(out, step):
    folder = out / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    torch.save({"step": step}, folder / "trainer_state.pt")
    return folder


def test_a_new_run_refuses_a_folder_holding_a_run_and_overwrite_removes_that_runs_files(tiny, tmp_path):
    out = tmp_path / "run"
    first = train(_cfg(tiny, out, steps=2), log=lambda s: None)
    with pytest.raises(ConfigError, match="holds a finished run: --overwrite-output-dir starts a new run there"):
        Trainer(_cfg(tiny, out, steps=2))
    # interrupted: the new run's config is written, the old adapters, report and PEFT folder are gone
    (out / "notes.txt").write_text("mine")
    logs = []

    class Stop(Exception):
        pass

    trainer = Trainer(_cfg(tiny, out, steps=2, lr=3e-3, overwrite_output_dir=True), log=logs.append)
    trainer._train = lambda *args: (_ for _ in ()).throw(Stop())   # stops before the first step
    with pytest.raises(Stop):
        trainer.run()
    assert any("removed the previous run's files (--overwrite-output-dir)" in m for m in logs), logs
    assert set(os.listdir(out)) <= {"config.json", "notes.txt", "train_log.jsonl"}
    assert "notes.txt" in os.listdir(out)
    assert json.loads((out / "config.json").read_text())["lr"] == 3e-3
    assert not os.path.exists(first["peft_adapter"])
    assert previous_run(str(out)) == "a run stopped before its first checkpoint"


def test_an_interrupted_run_is_named_with_its_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    TrainConfig(output_dir=str(out)).save(str(_mkdir(out) / "config.json"))
    for step in (10, 20):
        _fake_checkpoint(out, step)
    with pytest.raises(ConfigError, match="an interrupted run \\(its last checkpoint is step 20\\): --resume "
                                          "continues it, --overwrite-output-dir"):
        check_output_dir(str(out), resume=False, overwrite=False)
    check_output_dir(str(out), resume=True, overwrite=False)
    check_output_dir(str(out), resume=False, overwrite=True)
    # `latest` names a checkpoint removed by hand: the newest one left
    (out / "checkpoints" / "latest").write_text("step-000030\n")
    assert latest_checkpoint(str(out)) == str(out / "checkpoints" / "step-000020")
    assert clear_previous_run(str(out)) and not os.path.exists(out / "checkpoints")


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_folders_a_run_must_not_write_to(tiny, tmp_path, monkeypatch):
    model_dir, _ = tiny
    with pytest.raises(ConfigError, match="is the --model folder"):
        check_output_dir(model_dir, resume=False, overwrite=True, model=model_dir)
    with pytest.raises(ConfigError, match="holds a config.json that is not a run's"):
        check_output_dir(model_dir, resume=False, overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="--output-dir .*afile is a file, not a folder"):
        check_output_dir(str(tmp_path / "afile"), resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="--output-dir is empty"):
        check_output_dir("", resume=False, overwrite=False)
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)   # (root may write anywhere: pretend)
    with pytest.raises(ConfigError, match="--to .*new/deeper: cannot write in .*Read-only file system"):
        check_writable(str(tmp_path / "new" / "deeper"), "--to")


def test_the_runs_own_files_are_not_data_and_paths_are_saved_absolute(tiny, tmp_path, monkeypatch):
    model_dir, data_dir = tiny
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("the king speaks " * 50)
    (data / "run").mkdir()
    (data / "run" / "train_log.jsonl").write_text('{"step": 1}\n')
    (data / "run" / "notes.txt").write_text("the queen answers " * 50)
    assert find_text_files([str(data)], skip=own_paths(str(data / "run"))) == [str(data / "a.txt"),
                                                                               str(data / "run" / "notes.txt")]
    assert len(find_text_files([str(data)])) == 3
    # the run's folder holding the data folder: the data is read (only the run's own files are left out)
    assert find_text_files([str(data)], skip=own_paths(str(tmp_path))) == find_text_files([str(data)])
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(model=os.path.relpath(model_dir), data=["data"], output_dir="out").validate()
    assert cfg.model == os.path.abspath(model_dir) and cfg.data == [str(data)]
    assert TrainConfig().validate().model == "smollm2"
    cfg.save(str(_mkdir(tmp_path / "out") / "config.json"))
    # --resume compares the paths named, however spelled
    resume_config("out", {"data": ["./data/"], "model": os.path.abspath(model_dir)})
    with pytest.raises(ConfigError, match="--data"):
        resume_config("out", {"data": [str(tmp_path)]})


def test_command_line_mistakes_and_an_interrupt_get_a_line_not_a_traceback(tiny, tmp_path, capsys, monkeypatch):
    assert cli_main(["evaluate", "--output-dir", "x"]) == 2
    assert "unknown command 'evaluate': give one of train, demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--output_dri", "x"])   # (Hugging Face's --output_dir is --output-dir: tests/test_flags.py)
    assert "(did you mean: --output_dri -> --output-dir?)" in capsys.readouterr().err
    model_dir, data_dir = tiny
    argv = ["--model", model_dir, "--data", data_dir, "--output-dir", str(tmp_path / "run"), "--device", "cpu"]
    assert cli_main(argv + ["--alpha", "0"]) == 2
    assert "--alpha must not be 0" in capsys.readouterr().err
    assert cli_main(argv + ["--trainable-token-indices", " , "]) == 2
    assert "--trainable-token-indices is empty" in capsys.readouterr().err

    def interrupted(cfg, **kwargs):
        _fake_checkpoint(_mkdir(tmp_path / "run"), 50)
        raise KeyboardInterrupt

    monkeypatch.setattr("qlora_ext.train.trainer.train", interrupted)
    assert cli_main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; the last checkpoint is" in err and "step-000050" in err and "--resume` continues" in err


def test_a_file_given_twice_is_noted(tiny, tmp_path):
    model_dir, data_dir = tiny
    one = sorted(os.listdir(data_dir))[0]
    logs = []
    Trainer(_cfg(tiny, tmp_path / "run", data=[data_dir, os.path.join(data_dir, one)]), log=logs.append).setup()
    assert any(f"{one} is in --data more than once, and trained on as often" in m for m in logs), logs


def test_an_interrupted_run_is_evaluated_sampled_and_merged_at_a_checkpoint(tiny, tmp_path, capsys):
    """eval, generate and merge take --checkpoint: a run whose report and final adapters are not there yet (an
    interrupted one) is rebuilt with that checkpoint's adapters; its held-out blocks come from the checkpoint."""
    import shutil
    from qlora_ext.train.eval_run import evaluate_run
    out = tmp_path / "run"
    r = train(_cfg(tiny, out, steps=8, save_every=4, eval_every=4, dropout=0.0), log=lambda s: None)
    evals = {e["step"]: e["loss"] for e in json.loads((out / "report.json").read_text())["evals"]}
    for name in ("adapter.safetensors", "report.json", "report.md", "loss.png"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "peft_adapter")
    with pytest.raises(ConfigError, match="the run has not finished .*give --checkpoint; its checkpoints: "
                                          "steps 4, 8"):
        evaluate_run(str(out))
    for spelling in ("4", "step-000004", str(out / "checkpoints" / "step-000004")):
        result = evaluate_run(str(out), checkpoint=spelling)
        assert math.isclose(result["loss"], evals[4], rel_tol=1e-6) and "at step-000004" in result["what"]
    with pytest.raises(ConfigError, match="--checkpoint 5: no adapter.safetensors"):
        evaluate_run(str(out), checkpoint="5")
    assert cli_main(["generate", "--output-dir", str(out), "--checkpoint", "latest", "--max-new-tokens", "3",
                     "--temperature", "0"]) == 0
    assert cli_main(["merge", "--output-dir", str(out), "--checkpoint", "8", "--to", str(tmp_path / "m")]) == 0
    assert "adapters of " in (tmp_path / "m" / "MERGED_FROM.txt").read_text()
    assert r["steps"] == 8


def test_starting_over_removes_the_runs_own_files_only(tmp_path):
    """A link among the run's files goes as the link (its target stays), another tool's entries in checkpoints/
    stay, a user's log or TensorBoard folder is not replaced without --overwrite-output-dir, and the run's own
    inputs inside what would be removed are refused."""
    out = _mkdir(tmp_path / "run")
    TrainConfig(output_dir=str(out)).save(str(out / "config.json"))
    elsewhere = _mkdir(tmp_path / "elsewhere")
    _fake_checkpoint(elsewhere, 8)
    os.symlink(elsewhere / "checkpoints", out / "checkpoints")
    _mkdir(out / "peft_adapter")
    check_output_dir(str(out), resume=False, overwrite=True)
    with pytest.raises(ConfigError, match="peft_adapter is inside the files of the run .* copy it elsewhere"):
        check_output_dir(str(out), resume=False, overwrite=True, inputs=[str(out / "peft_adapter"), None])
    assert clear_previous_run(str(out))
    assert not os.path.lexists(out / "checkpoints") and os.path.isdir(elsewhere / "checkpoints" / "step-000008")
    _fake_checkpoint(out, 4)
    _mkdir(out / "checkpoints" / "checkpoint-500")   # another tool's
    clear_previous_run(str(out))
    assert os.listdir(out / "checkpoints") == ["checkpoint-500"]
    # another tool's checkpoints/ in a fresh folder is no run's; an input the clearing keeps is no problem
    other = _mkdir(tmp_path / "other")
    _mkdir(other / "checkpoints" / "checkpoint-500")
    check_output_dir(str(other), resume=False, overwrite=False)
    check_output_dir(str(out), resume=False, overwrite=True, inputs=[str(out / "checkpoints" / "checkpoint-500")])
    user = _mkdir(tmp_path / "user")
    _mkdir(user / "tensorboard" / "other_project")
    with pytest.raises(ConfigError, match="holds tensorboard, which the run would replace"):
        check_output_dir(str(user), resume=False, overwrite=False)
    (_mkdir(tmp_path / "bad") / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a run's config"):
        resume_config(str(tmp_path / "bad"), {})


def test_more_steps_are_refused_where_the_longer_run_would_differ(tiny, tmp_path, capsys):
    """The old run's last eval fed the best-model and early-stopping decisions (--steps not a multiple of
    --eval-every): refused; a run that stopped early would train nothing more: refused."""
    model_dir, data_dir = tiny
    common = ["--model", model_dir, "--data", data_dir, "--seq-len", "32", "--eval-blocks", "4", "--batch-size", "4",
              "--r", "4", "--alpha", "8", "--device", "cpu", "--no-progress", "--schedule", "constant"]
    out = str(tmp_path / "best")
    assert cli_main(common + ["--output-dir", out, "--steps", "3", "--eval-every", "2",
                              "--load-best-model-at-end"]) == 0
    assert cli_main(["--output-dir", out, "--resume", "--steps", "6", "--no-progress"]) == 2
    assert "best-model and early-stopping decisions" in capsys.readouterr().err
    out = str(tmp_path / "stopped")
    assert cli_main(common + ["--output-dir", out, "--steps", "6", "--eval-every", "1", "--lr", "1.0",
                              "--early-stopping-patience", "1", "--early-stopping-threshold", "100"]) == 0
    assert cli_main(["--output-dir", out, "--resume", "--steps", "12", "--no-progress"]) == 2
    assert "the run's patience ran out" in capsys.readouterr().err
