"""The compute ceiling: each model's built artifact called in-process (no server), at batch
sizes 1..64, with the thread count the server uses. Prints samples/s per batch size and the best.

    .venv/bin/python scripts/ceiling.py --plugins-dir bench/plugins --model-repository bench-results/models
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hub import process
from hub.cli.build import throughput
from hub.pipeline.builder import Builder
from hub.plugins.manager import PluginHost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plugins-dir", type=Path, default=Path("plugins"))
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.5, help="per batch size")
    parser.add_argument("--batch-sizes", default="1,4,16,32,64")
    args = parser.parse_args()
    process.configure(args.threads, args.model_repository)
    host = PluginHost(args.plugins_dir, entry_points=False)
    builder = Builder(args.model_repository, host.collect_targets(), host, device="cpu", threads=args.threads)
    for spec in host.collect_models():
        artifact = builder.ensure(spec)
        best = (0.0, 0)
        cells = []
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            # The spec's own examples (after its preprocess), tiled to the batch size.
            rate = throughput(artifact.runtime, spec, batch, args.seconds)
            if rate is None:
                continue
            cells.append(f"b{batch}={rate:,.0f}/s")
            best = max(best, (rate, batch))
        summary = f"best {best[0]:,.0f}/s at b{best[1]}"
        print(f"{spec.name} ({spec.target}, {args.threads} thread): {' '.join(cells)}; {summary}")


if __name__ == "__main__":
    main()
