"""Local data building: documents from a source tree, planted-fact instructions, the tokenizer."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from jenga.data.corpus import document_text, retrieval_records, source_documents, split_of, train_tokenizer


def test_documents_group_packages_and_skip_tests(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "m.py").write_text("def f():\n    return 2\n")
    (tmp_path / "pkg" / "tests").mkdir()
    (tmp_path / "pkg" / "tests" / "t.py").write_text("assert True\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "__init__.py").write_text("")
    docs = dict(source_documents(tmp_path))
    assert sorted(docs) == ["a", "pkg"]
    assert [p.name for p in docs["pkg"]] == ["__init__.py", "m.py"]
    text = document_text(tmp_path, docs["pkg"])
    assert "# file: pkg/m.py" in text and "return 2" in text
    # pinned: a document's split must not move between builds (the held-out set would leak into training)
    assert [split_of(name) for name in ("pkg", "a", "b", "e")] == ["train", "train", "test", "validation"]


def test_retrieval_records_plant_the_answer():
    text = "\n".join(f"line {i}" for i in range(400))
    records = retrieval_records(text, "doc", context_chars=1000, facts=3, rng=random.Random(0))
    assert len(records) >= 2
    for record in records:
        key = record["instruction"].split()[-1].rstrip(".")
        assert f"# fact: {key} = {record['answers'][0]}" in record["context"]
        assert record["text"].endswith(f"### Answer\n{record['answers'][0]}")


def test_tokenizer_trains_and_loads(tmp_path):
    texts = ["def add(a, b):\n    return a + b\n" * 20, "class Foo:\n    pass\n" * 20]
    train_tokenizer(texts, 300, tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = tokenizer("def add(a, b):")["input_ids"]
    assert tokenizer.decode(ids) == "def add(a, b):" and len(tokenizer) <= 300
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
