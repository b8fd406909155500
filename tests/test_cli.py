"""The command line as a user meets it: real ``python -m signscale`` processes, exit codes, messages."""

import argparse
import os
import subprocess
import sys

import pytest

import signscale

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.cli.core", "signscale.data.show", "signscale.reports")

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _cli(*args, cwd=None, env=None, timeout=600):
    # PYTHONPATH: the sources of this checkout, also when the test runs in another folder (cwd)
    base = {k: v for k, v in os.environ.items() if k != "SIGNSCALE_DEBUG"}
    env = {**base, "PYTHONPATH": SRC + os.pathsep + base.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "signscale", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout, check=False)


def _commands() -> list[list[str]]:
    """Every runnable command path: [train], [data, info], [bench, io], ..."""
    from signscale.cli import build_parser

    out: list[list[str]] = []

    def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            out.append(path)
        for a in subs:
            for name, child in a.choices.items():
                walk(child, [*path, name])

    walk(build_parser(), [])
    return out


def test_version_sources_help():
    assert signscale.__version__ in _cli("version").stdout
    out = _cli("sources").stdout
    assert all(k in out for k in ("gtsrb", "gtsrb-test", "folder", "synthetic"))
    assert "pack" in _cli("--help").stdout


def test_bad_input_gives_one_clear_line_and_exit_2(tmp_path):
    r = _cli("show", f"gtsrb:{tmp_path}/missing.zip")
    assert r.returncode == 2 and "missing.zip" in r.stdout
    r = _cli("show", "gtsbr:/x")
    assert r.returncode == 2 and "gtsrb" in r.stdout  # names the closest kind
    r = _cli("train", "--data=x", "--epocs=3")
    assert r.returncode == 2 and "did you mean --epochs?" in r.stderr  # unknown key names the closest valid one
    r = _cli("train", "data=x", "epocs=3")  # the same typo as key=value: the config layer names it
    assert r.returncode == 2 and "epochs" in r.stdout


def test_an_error_stays_one_unbroken_line_with_its_text_as_written(tmp_path):
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8)
    r = _cli("data", "info", str(deep / "[v2]"), env={"COLUMNS": "60"})
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stdout
    assert str(deep / "[v2]") in lines[0]  # not wrapped at 60 columns, brackets not taken for markup


@pytest.mark.parametrize("args, suggestion", [
    (["predict", "--topk", "3"], "did you mean --top-k?"),  # before the missing positionals are mentioned
    (["predict", "m", "x.png", "--topk=3"], "did you mean --top-k?"),
    (["demo", "--epoch", "1"], "did you mean --epochs?"),  # no prefix matching: never taken as --epochs
    (["pack", "src", "out", "--size", "16"], "did you mean --image-size?"),  # a renamed key finds its new name
    (["serve", "m", "--max-batchsize", "4"], "did you mean --max-batch?"),
    (["train", "--augment.flipp", "0.2"], "did you mean --augment.flip?"),
    (["bench", "io", "--worker", "2"], "did you mean --workers?"),
    (["trian"], "did you mean 'train'?"),
])
def test_an_unknown_option_is_a_usage_error_naming_the_closest_one(args, suggestion):
    r = _cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert suggestion in r.stderr and "usage: signscale" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_every_command_answers_help_with_its_keys():
    commands = _commands()
    assert len(commands) > 25 and ["train"] in commands and ["data", "info"] in commands
    for path in commands:
        r = _cli(*path, "--help")
        assert r.returncode == 0, (path, r.stderr)
        assert r.stdout.startswith(f"usage: signscale {' '.join(path)}"), (path, r.stdout[:200])
    # config commands list every key with its type, default and comment, in sections
    out = _cli("train", "--help", env={"COLUMNS": "200"}).stdout
    from signscale import config
    from signscale.training.train import TrainConfig

    for k in config.keys(TrainConfig):
        assert f"--{k.name.replace('_', '-')} " in out, k.name
    assert "--max-steps INT" in out and "stop after this many optimizer steps (0: epochs decide) (default: 0)" in out
    assert "--precision {fp32,bf16,fp16}" in out and "--augment.flip FLOAT" in out
    assert [s for s in ("data", "model", "optimisation", "precision", "distributed", "output")
            if f"\n{s} (TrainConfig keys):" not in out] == []


@pytest.mark.slow
def test_key_value_and_key_equals_value_mean_the_same(synthetic_dataset, tmp_path):
    """The first-hour failure: `train --data=D --epochs 1` read `1` as a YAML file."""
    r = _cli("train", f"--data={synthetic_dataset}", "--epochs", "1", "--max_steps=1", "--batch-size", "32",
             "--workers=0", "--no-progress", "--augment.flip", "0", "--out", str(tmp_path / "run"),
             "seed=3", cwd=tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "trained 1 steps" in r.stdout
    import yaml

    from signscale.training import checkpoint

    _, meta = checkpoint.load_model_artefact(str(tmp_path / "run" / "model"))
    cfg = meta["train_config"]
    assert cfg["max_steps"] == 1 and cfg["batch_size"] == 32 and cfg["augment"]["flip"] == 0.0
    assert cfg["seed"] == 3 and cfg["progress"] is False and yaml is not None


def test_config_keys_take_both_forms_and_dict_keys_one_at_a_time():
    from signscale import config
    from signscale.cli import build_parser
    from signscale.cli._commands import config_args
    from signscale.training.train import TrainConfig

    p = build_parser()
    a = p.parse_args(["train", "--data", "d1,d2", "--country-weights.cn", "4", "--country-weights.de=1",
                      "--channels-last", "--model_kwargs.width=2", "lr=0.01"])
    cfg = config.load(TrainConfig, None, config_args(a))
    assert cfg.data == ("d1", "d2") and cfg.country_weights == {"cn": 4.0, "de": 1.0}
    assert cfg.channels_last is True and cfg.model_kwargs == {"width": 2} and cfg.lr == 0.01
    # an architecture's keywords arrive as the values they spell, lists included, in either form
    for form in (["--model-kwargs", "widths=48,96,192,dropout=0.2,stn=true,contrast=local"],
                 ["--model-kwargs.widths=[48,96,192]", "--model-kwargs.dropout", "0.2", "model_kwargs.stn=true",
                  "--model-kwargs.contrast=local"]):
        cfg = config.load(TrainConfig, None, config_args(p.parse_args(["train", *form])))
        assert cfg.model_kwargs == {"widths": [48, 96, 192], "dropout": 0.2, "stn": True, "contrast": "local"}


def test_no_abbreviations_anywhere():
    from signscale.cli import build_parser

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for child in a.choices.values():
                    yield from parsers(child)

    assert all(not p.allow_abbrev for p in parsers(build_parser()))
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["compare", "a", "b", "--tol", "0.1"])
    assert e.value.code == 2


def test_unknown_model_is_one_line_listing_the_known_ones(tmp_path):
    r = _cli("train", "--data=x", "--model=resnet50")
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and "resnet50" in lines[0] and "resnet18_small" in lines[0] and "msnet" in lines[0]


def test_an_unexpected_error_is_one_line_and_a_traceback_only_with_debug(tmp_path):
    bad = tmp_path / "report"
    bad.mkdir()
    (bad / "metrics.json").write_text("[1, 2]")  # valid JSON, wrong shape: no kind of bad input the CLI knows
    for debug_args, env in (([], {}), (["--debug"], {}), ([], {"SIGNSCALE_DEBUG": "1"})):
        r = _cli(*debug_args, "compare", str(bad), str(bad), env=env)
        assert r.returncode == 1, (r.stdout, r.stderr)
        if debug_args or env:
            assert "Traceback" in r.stderr
        else:
            assert "Traceback" not in r.stderr and "--debug" in r.stdout
            assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) == 1


def test_sources_lists_each_kinds_options_with_defaults_uncut():
    r = _cli("sources", env={"COLUMNS": "80"})
    assert r.returncode == 0
    assert "val_fraction=0.1" in r.stdout and "split=all" in r.stdout  # gtsrb's options with defaults
    assert "gtsrb:GTSRB_Final_Training_Images.zip?split=train&val_fraction=0.1" in r.stdout  # not cut at 80
    assert "…" not in r.stdout
    one = _cli("sources", "gtsrb")
    assert one.returncode == 0 and "gtsrb:" in one.stdout and "synthetic" not in one.stdout
    typo = _cli("sources", "gtsbr")
    assert typo.returncode == 2 and "gtsrb" in typo.stdout + typo.stderr


@pytest.mark.slow
def test_exit_1_when_nothing_usable_came_out(tmp_path):
    """0 only when the work was done: 0 of 1 images classified, or 0 samples packed, is a failure."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_predict import make_model

    model = make_model(str(tmp_path / "model"))
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    r = _cli("predict", model, str(text))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "0 of 1 image(s) classified" in r.stdout
    from PIL import Image

    Image.new("RGB", (24, 24), (200, 30, 30)).save(tmp_path / "sign.png")
    r = _cli("predict", model, str(tmp_path / "sign.png"), str(text))  # one of two: the work was done
    assert r.returncode == 0 and "1 of 2 image(s) classified" in r.stdout

    folder = tmp_path / "signs"
    for cls in ("stop", "yield"):
        (folder / cls).mkdir(parents=True)
        (folder / cls / "a.jpg").write_text("these are not images")
    r = _cli("pack", f"folder:{folder}", str(tmp_path / "ds"), "--workers", "0", "--no-progress")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "packed 0 samples" in r.stdout and "no sample" in r.stdout


def test_data_info_is_a_table_of_plain_values(synthetic_dataset):
    r = _cli("data", "info", synthetic_dataset, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert "{" not in r.stdout and "'kind'" not in r.stdout and "…" not in r.stdout  # no raw dict, nothing cut
    assert "source kind" in r.stdout and "synthetic" in r.stdout and "quarantine count" in r.stdout
