"""`python -m train.prepare`: tokenize text or JSONL files into a shard directory.

    python -m train.prepare --input 'data/*.txt' --output /fsx/shards/mycorpus
    python -m train.prepare --input s3://bucket/raw/*.jsonl --format jsonl --jsonl-key text \\
        --tokenizer bpe --vocab-size 32000 --output s3://bucket/shards/mycorpus

Then train on it with `data.source=shards data.path=<output>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from train.data.prepare_lib import FORMATS, TOKENIZERS, PrepareError, prepare
from train.data.shards import DEFAULT_SHARD_TOKENS


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help="input files or globs (local or fsspec URLs such as s3://)")
    p.add_argument("--output", required=True, help="shard directory (local, FSx or s3://)")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text: one document per file; jsonl: one per line")
    p.add_argument("--jsonl-key", default="text", help="JSONL field holding the text")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="byte")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per shard file")
    p.add_argument("--storage-options", default="{}",
                   help="JSON dict passed to fsspec, e.g. '{\"endpoint_url\": \"http://...\"}'")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        so = json.loads(args.storage_options)
        if not isinstance(so, dict):
            raise PrepareError("--storage-options must be a JSON object")
        prepare(args.input, args.output, fmt=args.format, jsonl_key=args.jsonl_key,
                tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                storage_options=so, log=lambda m: print(m, flush=True))
    except (PrepareError, ImportError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
