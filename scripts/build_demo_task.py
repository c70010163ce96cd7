"""Write the demo's task data: ISO dates -> dates written out, as prompt/completion JSONL (train and held-out).

    python scripts/build_demo_task.py

The held-out dates never occur in the training file. See ``demo_text.task_examples`` for the format.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_text

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "demo_assets" / "task"


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    heldout = demo_text.task_examples(args.heldout, seed=args.seed)
    prompts = {row["prompt"] for row in heldout}
    train = demo_text.task_examples(args.train, seed=args.seed + 1, exclude={p.split()[1] for p in prompts})
    assert not prompts & {row["prompt"] for row in train}
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} training and {len(heldout)} held-out examples to {args.out}")


if __name__ == "__main__":
    main()
