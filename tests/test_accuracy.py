"""The accuracy study's pipeline on a tiny built dataset and a tiny base model: tasks, loaders, fine-tune
(every method), merge, evaluation and the lm_eval tasks."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from jenga import JengaConfig
from jenga.data import corpus, loaders, tasks
from jenga.experiments import accuracy, finetune, merge
from jenga.predictor import PredictorBundle

REPO = Path(__file__).resolve().parents[1]
LENGTHS = (384, 512)


def _source_tree(root: Path, docs: int = 30) -> list[tuple[str, Path, list[tuple[str, list[Path]]]]]:
    rng = random.Random(0)
    for i in range(docs):
        lines = [f"def f_{i}_{j}(x):\n    return x * {rng.randrange(100)} + {j}\n" for j in range(60)]
        (root / f"mod_{i}.py").write_text("".join(lines))
    return [("tiny", root, corpus.source_documents(root))]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("data")
    corpus.build(out, vocab_size=600, sources=_source_tree(root), eval_lengths=LENGTHS, per_cell=1)
    return out


@pytest.fixture(scope="module")
def base(built, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    tokenizer = AutoTokenizer.from_pretrained(built / "tokenizer")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_build_is_deterministic(built, tmp_path):
    again = tmp_path / "again"
    source = tmp_path / "src"
    source.mkdir()
    corpus.build(again, vocab_size=600, sources=_source_tree(source), eval_lengths=LENGTHS, per_cell=1)
    for rel in ["code-corpus/train.jsonl", "tokenizer/tokenizer.json", "longbench/passkey.jsonl"]:
        assert (again / rel).read_bytes() == (built / rel).read_bytes(), rel
    assert torch.equal(torch.load(again / "tokens/train.pt")["ids"], torch.load(built / "tokens/train.pt")["ids"])


def test_examples_have_exact_length_and_the_answer_in_context(built):
    tokenizer = AutoTokenizer.from_pretrained(built / "tokenizer")
    filler = loaders.load_documents(built, "train")[0].tolist() * 4
    rng = random.Random(1)
    for task in tasks.TASKS:
        example = tasks.make_example(task, filler, tokenizer, 300, rng, depth=0.5)
        assert len(example.ids) == 300
        record = example.record(tokenizer, 0)
        assert record["length"] == 300 and record["dataset"] == task
        if task == "var_tracking":
            names = record["answers"][0].split()
            assert len(names) == tasks.CHAIN and all(name in record["context"] for name in names)
            assert record["depth"] is None
        else:
            assert record["answers"][0] in record["context"]
    passkey = tasks.make_example("passkey", filler, tokenizer, 300, random.Random(2), depth=0.0)
    assert tokenizer.decode(passkey.context_ids).startswith("# The pass key is")


def test_examples_reject_lengths_that_cannot_hold_the_task(built):
    tokenizer = AutoTokenizer.from_pretrained(built / "tokenizer")
    with pytest.raises(ValueError, match="too short"):
        tasks.make_example("kv_retrieval", list(range(500)), tokenizer, 20, random.Random(0))
    with pytest.raises(ValueError, match="filler holds"):
        tasks.make_example("passkey", [5] * 10, tokenizer, 200, random.Random(0))


def test_eval_sets_cover_every_cell(built):
    records = [json.loads(line) for line in (built / "longbench/passkey.jsonl").read_text().splitlines()]
    cells = {(r["length"], r["depth"]) for r in records}
    assert cells == {(n, d) for n in LENGTHS for d in corpus.EVAL_DEPTHS}
    assert set(records[0]) >= {"input", "context", "answers", "length", "_id", "dataset"}


def test_loaders_read_user_formats(tmp_path):
    rows = [
        {"text": "plain document"},
        {"messages": [{"role": "user", "content": "question"}, {"role": "assistant", "content": "reply"}]},
        {"context": "ctx", "input": "what?", "answers": ["this"]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = loaders.load_texts(tmp_path)
    assert texts[0] == "plain document"
    assert "### User\nquestion" in texts[1] and "### Assistant\nreply" in texts[1]
    assert texts[2].endswith("### Question\nwhat?\n### Answer\nthis")
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(loaders.DataFormatError, match="train.jsonl:1.*`text`"):
        loaders.load_texts(path)
    with pytest.raises(FileNotFoundError):
        loaders.load_texts(tmp_path / "missing")


def test_loaders_read_a_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    assert loaders.load_texts(tmp_path / "ds") == ["one", "two"]


def test_token_cache_matches_the_text(built):
    tokenizer = AutoTokenizer.from_pretrained(built / "tokenizer")
    cached = loaders.load_documents(built, "train")
    text = [json.loads(line)["text"] for line in (built / "code-corpus/train.jsonl").read_text().splitlines()]
    assert len(cached) == len(text)
    assert cached[0].tolist() == tokenizer(text[0], add_special_tokens=False)["input_ids"]


def _finetune(base: Path, built: Path, out: Path, method: str, *extra: str) -> None:
    argv = ["--base", str(base), "--method", method, "--seq-len", "384", "--steps", "2", "--batch", "2"]
    finetune.main([*argv, "--data", str(built), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def predictor(base, tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base)
    config = finetune.accuracy_method("jenga", None).jenga
    bundle = PredictorBundle(model.config.hidden_size, model.config.num_hidden_layers, [2], config, units=16)
    folder = tmp_path_factory.mktemp("predictor")
    bundle.save(folder)
    return folder


@pytest.mark.parametrize("method", [*finetune.ACCURACY_METHODS, "jenga-a0.9-fp8", *finetune.SAMPLED])
def test_every_method_finetunes_and_merges_to_the_same_model(base, built, predictor, tmp_path, method):
    extra = ["--predictor", str(predictor)] if method == "jenga-predictor" else []
    _finetune(base, built, tmp_path / "run", method, "--merged", *extra)
    log = [json.loads(line) for line in (tmp_path / "run/finetune_log.jsonl").read_text().splitlines()]
    assert log[0]["method"] == method and log[-1]["status"] == "ok"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if r.get("record") == "step")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run/merged", dtype=torch.float32)
    assert merged.config.rope_parameters["rope_type"] == "linear" and merged.config.rope_parameters["factor"] == 2.0
    shutil.rmtree(tmp_path / "run/merged")
    rebuilt = finetune.load_merged(tmp_path / "run", base, dtype=torch.float32)
    ids = torch.arange(40)[None] % merged.config.vocab_size
    torch.testing.assert_close(rebuilt(ids).logits, merged(ids).logits, atol=0.05, rtol=0.05)
    extras = (tmp_path / "run/adapter" / finetune.EXTRAS).exists()
    assert extras, "the trained norms must be saved beside the LoRA weights"


def test_ablations_change_one_schedule_field():
    jenga = finetune.accuracy_method("jenga-0.5", None).jenga
    for name, change in {**finetune.JENGA_ABLATIONS, **finetune.SAMPLED}.items():
        config = finetune.accuracy_method(name, None).jenga
        differs = {k for k, v in config.to_dict().items() if v != jenga.to_dict()[k]}
        assert differs == set(change), name


def test_authors_method_is_sized_to_the_model():
    config = finetune.accuracy_method("jenga-authors", None, layers=6).jenga
    assert config.attn_schedule(6) == [1.0, 1.0, 1.0, 0.4, 0.4, 1.0] and config.eliminated == "zero"
    with pytest.raises(ValueError, match="number of layers"):
        finetune.accuracy_method("jenga-authors", None)


def test_finetune_names_missing_predictor():
    with pytest.raises(ValueError, match="--predictor"):
        finetune.accuracy_method("jenga-predictor", None)
    with pytest.raises(ValueError, match="accuracy study compares"):
        finetune.accuracy_method("liger", None)


def test_evaluation_logs_perplexity_and_every_cell(base, built, tmp_path):
    _finetune(base, built, tmp_path / "runs/lora-s0", "lora")
    logs = tmp_path / "logs"
    accuracy.main(
        ["--base", str(base), "--runs", str(tmp_path / "runs/lora-s0"), "--data", str(built), "--windows", "64"]
        + ["--limit", "4", "--logs", str(logs)]
    )
    for name in ("base", "lora-s0"):
        records = [json.loads(line) for line in (logs / f"{name}.jsonl").read_text().splitlines()]
        ppl = [r for r in records if r["record"] == "perplexity"]
        assert ppl[0]["window"] == 64 and ppl[0]["perplexity"] > 1 and ppl[0]["tokens"] > 0
        cells = [r for r in records if r["record"] == "task"]
        assert {r["task"] for r in cells} == set(tasks.TASKS)
        assert sum(r["samples"] for r in cells) == 4 * len(tasks.TASKS)
        assert all(0 <= r["score"] <= 100 for r in cells)
    assert records[0]["method"] == "lora" and records[0]["seed"] == 0


def test_merge_command_writes_a_loadable_checkpoint(base, built, tmp_path):
    _finetune(base, built, tmp_path / "run", "jenga")
    merge.main(["--base", str(base), "--run", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.max_position_embeddings == 384
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge.main(["--base", str(base), "--run", str(tmp_path), "--out", str(tmp_path / "x")])


@pytest.mark.integration
def test_lm_eval_tasks_run_on_a_tiny_checkpoint(base, built, tmp_path):
    if shutil.which("lm_eval") is None and not (Path(sys.executable).parent / "lm_eval").exists():
        pytest.fail("lm_eval is part of the test environment (.ci/requirements-ci.txt); install it")
    work = tmp_path / "work"
    shutil.copytree(REPO / "tasks", work / "tasks")
    shutil.copytree(built / "longbench", work / "dataset/longbench")
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", "hf"]
    cmd += ["--model_args", f"pretrained={base}", "--tasks", "jenga_longcontext", "--include_path", "tasks"]
    cmd += ["--device", "cpu", "--limit", "2", "--output_path", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    produced = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    for task in tasks.TASKS:
        assert 0 <= produced[f"jenga_{task}"]["score,none"] <= 100


def _accuracy_log(path: Path, method: str, seed: int, ppl: float, passkey: list[float]) -> None:
    records = [{"record": "header", "experiment": "accuracy", "method": method, "seed": seed, "device": "cpu"}]
    records.append({"record": "perplexity", "window": 4096, "perplexity": ppl})
    records += [
        {"record": "task", "task": "passkey", "length": 1024 * (i + 1), "depth": 0.5, "samples": 10, "score": s}
        for i, s in enumerate(passkey)
    ]
    records.append({"record": "summary", "status": "ok"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_accuracy_tables_average_seeds_and_compare_with_lora(tmp_path):
    from jenga.plotting.accuracy import plot_accuracy

    _accuracy_log(tmp_path / "lora-s0.jsonl", "lora", 0, 10.0, [60.0, 40.0])
    _accuracy_log(tmp_path / "lora-s1.jsonl", "lora", 1, 12.0, [80.0, 60.0])
    _accuracy_log(tmp_path / "jenga-s0.jsonl", "jenga", 0, 11.55, [50.0, 50.0])
    (tmp_path / "incomplete-s0.jsonl").write_text(json.dumps({"record": "header", "experiment": "accuracy"}) + "\n")
    written = plot_accuracy(tmp_path, tmp_path / "out")
    table = written[0].read_text()
    assert "| lora | 0, 1 | 11.000 ± 1.000 | 60.0 ± 10.0 |" in table
    assert "| jenga | 0 | 11.550 | 50.0 |" in table
    assert "| jenga | 1.0500 | -10.0 |" in table
    assert "incomplete" not in table


def test_lm_eval_table_reads_the_newest_results_per_checkpoint(tmp_path):
    from jenga.plotting.accuracy import lm_eval_table

    def results(score: float) -> dict:
        return {
            "results": {"jenga_passkey": {"score,none": score}},
            "n-samples": {"jenga_passkey": {"original": 160, "effective": 20}},
            "lm_eval_version": "0.4.13",
            "config": {"device": "cuda:0", "model_args": {"pretrained": "./ckpt-a", "max_length": 4096}},
            "pretty_env_info": "CUDA used to build PyTorch: 13.0\nGPU 0: NVIDIA H200\n",
        }

    folder = tmp_path / "lm_eval" / "ckpt-a" / ".__ckpt-a"
    folder.mkdir(parents=True)
    (folder / "results_2026-01-01T00-00-00.json").write_text(json.dumps(results(10.0)))
    (folder / "results_2026-02-01T00-00-00.json").write_text(json.dumps(results(45.0)))
    table = lm_eval_table(tmp_path / "lm_eval")
    assert "| ckpt-a | 45.0 | 4096 |" in table and "samples per task: 20" in table
    assert "cuda:0 = NVIDIA H200" in table
    assert lm_eval_table(tmp_path / "missing") is None


def test_pretrain_runs_the_shared_loop_and_saves_a_checkpoint(built, tmp_path):
    """The toy-base pretraining: step records with the learning rate, a validation loss every `--eval-every`
    steps, a summary, and a checkpoint `from_pretrained` loads."""
    from jenga.experiments import pretrain
    from jenga.profiling import read_jsonl

    out = tmp_path / "base"
    pretrain.main(
        ["--data", str(built), "--out", str(out), "--hidden", "32", "--layers", "2", "--heads", "2"]
        + ["--seq-len", "128", "--batch", "2", "--max-steps", "4", "--eval-every", "2", "--minutes", "5"]
    )
    records = read_jsonl(out / "pretrain_log.jsonl")
    steps = [r for r in records if r["record"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3] and all(r["lr"] > 0 for r in steps)
    assert [("validation_loss" in r) for r in steps] == [False, True, False, True]
    assert records[-1]["record"] == "summary" and records[-1]["status"] == "ok" and records[-1]["steps"] == 4
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_finished_run_checks_the_logged_config(tmp_path):
    """run.sh skips a finished fine-tune only when it ran the method's config of today: a `jenga` run of the
    schema-3 default (keep 0.5 / 0.5) is an error for today's `jenga`, and finished for `jenga-0.5`."""
    run = tmp_path / "jenga-s0"
    assert not finetune.finished_run(run, "jenga")
    (run / "adapter").mkdir(parents=True)
    (run / "adapter/seq_len").write_text("4096")
    old = {**finetune.accuracy_method("jenga-0.5", None).jenga.to_dict(), "schema_version": 3}
    (run / "finetune_log.jsonl").write_text(json.dumps({"record": "header", "jenga_config": old}) + "\n")
    with pytest.raises(SystemExit, match="another Jenga config"):
        finetune.finished_run(run, "jenga")
    assert finetune.finished_run(run, "jenga-0.5")
    # today's default is logged as it ran (fp8_activations resolved for the model's family): finished
    ran = JengaConfig(fp8_activations=True).to_dict()
    (run / "finetune_log.jsonl").write_text(json.dumps({"record": "header", "jenga_config": ran}) + "\n")
    assert finetune.finished_run(run, "jenga")
    (run / "finetune_log.jsonl").write_text(json.dumps({"record": "header", "jenga_config": None}) + "\n")
    assert finetune.finished_run(run, "lora")


def test_finetune_refuses_a_folder_holding_a_finished_run(tmp_path):
    """A fine-tune never overwrites a finished one (run.sh's check can be bypassed, or the folder reused by hand):
    another config's run is the config error, the same config's says to move it away; the log stays intact."""
    run = tmp_path / "jenga-s0"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter/seq_len").write_text("4096")
    old = {**finetune.accuracy_method("jenga-0.5", None).jenga.to_dict(), "schema_version": 3}
    log = json.dumps({"record": "header", "jenga_config": old}) + "\n"
    (run / "finetune_log.jsonl").write_text(log)
    argv = ["--base", str(tmp_path / "absent"), "--data", str(tmp_path), "--out", str(run)]
    with pytest.raises(SystemExit, match="another Jenga config"):
        finetune.main([*argv, "--method", "jenga"])
    with pytest.raises(SystemExit, match="move it away"):
        finetune.main([*argv, "--method", "jenga-0.5"])
    assert (run / "finetune_log.jsonl").read_text() == log
