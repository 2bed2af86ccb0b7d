"""`python -m bench <suite> [args]`: benchmarks that print a table and write JSON."""

import sys

SUITES = {"smoke": "bench.smoke", "train": "bench.train_bench", "ckpt": "bench.ckpt_bench",
          "ckpt_drill": "bench.ckpt_drill", "attn": "bench.attn", "compare": "bench.compare",
          "split": "bench.split", "curves": "bench.curves", "table": "bench.table"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SUITES:
        print(f"usage: python -m bench {{{','.join(SUITES)}}} [--out DIR] ...", file=sys.stderr)
        sys.exit(2)
    import importlib

    importlib.import_module(SUITES[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
