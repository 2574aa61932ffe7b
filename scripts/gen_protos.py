"""Generate hub/protocol/generated/ from protos/ (`make protos`); `--check` fails when it is stale.

Two rewrites follow protoc:
- imports between the generated modules become package-relative;
- the descriptors go into a private descriptor pool instead of protobuf's default one. Our
  messages have the same full names as Triton's (`inference.ModelConfig`, ...), which is what
  wire compatibility means, so sharing the default pool with tritonclient's copies in one process
  (every test does that) would fail with "duplicate symbol".
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
TARGET = ROOT / "hub" / "protocol" / "generated"
POOL_MODULE = '"""Generated from protos/ by scripts/gen_protos.py; do not edit."""\n\n' + (
    "from google.protobuf import descriptor_pool\n\n"
    "# Private pool: see scripts/gen_protos.py for why not the default one.\n"
    "POOL = descriptor_pool.DescriptorPool()\n"
)


def generate(out: Path) -> None:
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(p.name for p in PROTOS.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    modules = [Path(s).stem + "_pb2" for s in sources]
    for path in sorted(out.glob("*.py*")):
        text = path.read_text()
        for mod in modules:
            text = re.sub(rf"^import {mod} as ", f"from . import {mod} as ", text, flags=re.M)
            text = re.sub(rf"^import {mod}$", f"from . import {mod}", text, flags=re.M)
        if path.suffix == ".py" and "_descriptor_pool.Default()" in text:
            text = text.replace(
                "from google.protobuf import descriptor_pool as _descriptor_pool\n",
                "from google.protobuf import descriptor_pool as _descriptor_pool  # noqa: F401\n"
                "from ._pool import POOL as _POOL\n",
            )
            text = text.replace("_descriptor_pool.Default()", "_POOL")
        path.write_text(text)
    (out / "_pool.py").write_text(POOL_MODULE)
    (out / "__init__.py").write_text(
        '"""Generated from protos/ by scripts/gen_protos.py (`make protos`); do not edit."""\n'
    )


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("*.py*"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if not args.check:
        for old in TARGET.glob("*.py*"):
            old.unlink()
        generate(TARGET)
        print(f"generated {TARGET.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh, committed = snapshot(Path(tmp)), snapshot(TARGET)
    if fresh != committed:
        changed = sorted(set(fresh) ^ set(committed) | {k for k in fresh if fresh[k] != committed.get(k)})
        print(f"stale generated protobuf code: {', '.join(changed)}; run `make protos`", file=sys.stderr)
        return 1
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
