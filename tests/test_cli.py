"""Command lines: every option documented with its default, and the runner's exit code and resumption when a
configuration fails."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama

from jenga.experiments import run
from jenga.profiling import read_jsonl

SRC = Path(__file__).resolve().parents[1] / "src"
CLI_MODULES = sorted(
    ".".join(path.relative_to(SRC).with_suffix("").parts)
    for package in ("experiments", "data")
    for path in (SRC / "jenga" / package).glob("*.py")
    if "parse_args(" in path.read_text()
)


def test_cli_modules_found():
    assert {"jenga.experiments.run", "jenga.experiments.predictor_train", "jenga.data.corpus"} <= set(CLI_MODULES)


@pytest.mark.parametrize("name", CLI_MODULES)
def test_help_documents_every_option(name, monkeypatch, capsys):
    parsers: list[argparse.ArgumentParser] = []
    parse_args = argparse.ArgumentParser.parse_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(name).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    parser = parsers[0]
    assert parser.description and parser.description.strip(), f"{name}: no description"
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter), name
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help and action.help.strip(), f"{name} {action.option_strings}: no help text"
        if action.default is not None:
            assert f"(default: {action.default})" in " ".join(out.split()), f"{name} {action.option_strings}"
    if name == "jenga.experiments.run":
        assert "trains a model for a few measured steps" in out and "peak memory and step time" in out
        assert "jenga-2d+ckpt" not in out and "<name>+ckpt" in out  # the method list stays one readable sentence


def test_progress_line_rounds():
    summary = {"status": "ok", "peak_gib": 12.345678, "median_step_s": 0.8123456}
    assert run.progress_line("jenga 4096", summary) == "jenga 4096: ok peak=12.35 GiB step=0.812 s"
    failed = {"status": "failed", "peak_gib": None, "error": "ValueError: bad"}
    assert run.progress_line("lora 64", failed) == "lora 64: failed peak=- step=- (ValueError: bad)"


@pytest.mark.integration
def test_failed_run_exits_nonzero_is_not_complete_and_is_retried(tmp_path):
    model, logs = tmp_path / "tiny", tmp_path / "logs"
    argv = ["--model", str(model), "--methods", "lora", "--seqs", "64", "--steps", "1", "--logs", str(logs)]
    cli = subprocess.run([sys.executable, "-m", "jenga.experiments.run", *argv], capture_output=True, text=True)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "1 of 1 configuration(s) failed" in cli.stdout
    log = logs / "tiny_lora_64.jsonl"
    summary = read_jsonl(log)[-1]
    assert summary["status"] == "failed" and "no config.json" in summary["error"]
    assert not run.is_complete(log)

    tiny_llama(kv_heads=2).config.save_pretrained(model)  # the cause fixed: the next sweep retries the run
    assert run.main(argv) == 0
    assert read_jsonl(log)[-1]["status"] == "ok" and run.is_complete(log)

    oom = tmp_path / "oom.jsonl"
    oom.write_text('{"record": "summary", "status": "oom"}\n')
    assert run.is_complete(oom)  # running out of memory is a result, not a failure
