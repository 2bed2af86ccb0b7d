"""``python -m checkpointing ls|verify|export RUN_OR_STEP_DIR``: checkpoints without the trainer.

``ls``     one line per step directory: step, status, tokens, size, age.
``verify`` per step: OK / PARTIAL (no marker) / FAIL, checking marker, meta.json and
           trainer_state.json, DCP ``.metadata``, and that every shard file it lists exists, covers
           its byte ranges and reads to the end (a DeepSpeed checkpoint: every file meta.json lists,
           at its size); then ``committed: ...`` and ``partial: ...`` lines.
           Exit 1 if any committed step fails, a named step directory is not committed, or nothing
           is committed.
``export`` the model weights as a Hugging Face directory (safetensors + config.json), see
           ``checkpointing.export``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List, Optional, Tuple

from checkpointing import _dcp, commit, layout, safe_pickle
from checkpointing.engine_state import check_files
from checkpointing.errors import CheckpointError
from checkpointing.filecheck import check_listed_files
from checkpointing.storage import Storage


def _parse_options(pairs: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--storage-option expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _step_dirs(st: Storage, path: str) -> Tuple[List[Tuple[int, str]], bool]:
    """(step, dir) pairs under a run directory, or the one step directory named; and whether the
    path named a single step."""
    path = path.rstrip("/")
    step = layout.parse_step(path)
    if step is not None:
        return [(step, path)], True
    steps = sorted(s for s in (layout.parse_step(n) for n in st.list_subdirs(path)) if s is not None)
    return [(s, layout.step_dir(path, s)) for s in steps], False


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def cmd_ls(path: str, st: Storage) -> int:
    dirs, _ = _step_dirs(st, path)
    if not dirs:
        print(f"no step directories under {path}")
        return 1
    print(f"{'step':>10}  {'status':<11} {'tokens':>14}  {'size':>9}  {'age':>6}  path")
    now = time.time()
    for step, d in dirs:
        committed = commit.is_committed(st, d)
        tokens, age = "-", "-"
        try:
            meta = commit.read_meta(st, d)
            tokens = str(meta.get("tokens", "-"))
            if "saved_at_unix" in meta:
                age = _age(now - float(meta["saved_at_unix"]))
        except Exception:  # noqa: BLE001 - an uncommitted step may have no meta yet
            pass
        status = "committed" if committed else "UNCOMMITTED"
        print(f"{step:>10}  {status:<11} {tokens:>14}  {_human(st.tree_size(d)):>9}  {age:>6}  {d}")
    return 0


def verify_step(st: Storage, d: str) -> List[str]:
    """Problems found in one step directory ([] = good)."""
    problems = []
    if not commit.is_committed(st, d):
        problems.append(f"no {layout.COMMIT_MARKER} marker (uncommitted)")
    found = {}
    for name in (layout.META_FILE, layout.TRAINER_STATE_FILE):
        try:
            found[name] = commit.read_json(st, layout.join(d, name))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: {type(e).__name__}: {e}")
    engine = (found.get(layout.META_FILE) or {}).get("engine")
    if engine:  # an engine's own format (DeepSpeed): the files meta.json lists, sizes and reads
        problems += check_files(st, d, engine, read=True)
        if engine.get("format") == "deepspeed" and st.is_local:  # what its torch.load would run
            for rel in sorted(engine.get("files") or {}):
                if rel.endswith(".pt") and not any(p.startswith(rel + ":") for p in problems):
                    try:
                        safe_pickle.check_torch_file(st.native(layout.join(d, rel)), rel,
                                                     safe_pickle.DEEPSPEED_GLOBALS)
                    except CheckpointError as e:
                        problems.append(str(e))
        return problems
    try:
        md = _dcp.read_metadata(st.native(d), st.is_local, st.storage_options)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{layout.DCP_METADATA_FILE}: {type(e).__name__}: {e}")
        return problems
    need: Dict[str, int] = {}  # shard file -> bytes it must hold
    for info in md.storage_data.values():
        rel = info.relative_path
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    return problems + check_listed_files(st, d, need, layout.DCP_METADATA_FILE, exact=False, read=True)


def cmd_verify(path: str, st: Storage) -> int:
    """One line per step (OK / PARTIAL / FAIL), then which steps are committed and which partial.
    A partial step (no marker: a save that died, or one in flight) is not a failure of the run,
    since resume skips it; naming one directly is. A committed step with problems always fails."""
    dirs, single = _step_dirs(st, path)
    if not dirs:
        print(f"FAIL {path}: no step directories")
        return 1
    failed = 0
    committed_steps, partial_steps = [], []
    for step, d in dirs:
        problems = verify_step(st, d)
        committed = commit.is_committed(st, d)
        if not committed:
            partial_steps.append(step)
            failed += int(single)
            print(f"PARTIAL {d} (no {layout.COMMIT_MARKER} marker: a save that did not finish; "
                  "resume skips it)")
            problems = [p for p in problems if "marker" not in p]
        elif not problems:
            committed_steps.append(step)
            print(f"OK   {d}")
        else:
            committed_steps.append(step)
            failed += 1
            print(f"FAIL {d}")
        for p in problems:
            print(f"     - {p}")
    n_committed = len(committed_steps)
    print(f"committed: {','.join(map(str, committed_steps)) or '-'}")
    print(f"partial: {','.join(map(str, partial_steps)) or '-'}")
    print(f"{len(dirs)} step dir(s), {n_committed} committed, {failed} failed")
    return 1 if failed or n_committed == 0 else 0


def cmd_export(args, options: Dict[str, Any]) -> int:
    from checkpointing.errors import CheckpointError
    from checkpointing.export import export

    try:
        out = export(args.path, args.out, step=args.step, dtype=args.dtype, config_path=args.config,
                     storage_options=options, experts_layout=args.experts_layout,
                     max_shard_bytes=int(args.max_shard_gb * 1e9))
    except CheckpointError as e:
        print(f"FAIL {e}")
        return 1
    print(f"exported to {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpointing", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("ls", "list step directories"), ("verify", "check shards and commit markers"),
                        ("export", "export model weights as a Hugging Face directory")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("path", help="a run's checkpoint directory or one step_NNNNNNNNN directory "
                                    "(local, FSx or s3://)")
        p.add_argument("--storage-option", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:5000")
        if name == "export":
            p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
            p.add_argument("--step", type=int, default=None, help="step to export (default: newest committed)")
            p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
            p.add_argument("--config", default=None,
                           help="config.yaml with the model: section (default: the run directory's)")
            p.add_argument("--experts-layout", default="per_expert", choices=("per_expert", "fused"),
                           help="routed experts as the Hub's per-expert tensors (default) or "
                                "transformers 5's fused 3-D gate_up_proj/down_proj")
            p.add_argument("--max-shard-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    options = _parse_options(args.storage_option)
    if args.cmd == "export":
        return cmd_export(args, options)
    st = Storage(args.path, options)
    return {"ls": cmd_ls, "verify": cmd_verify}[args.cmd](args.path, st)
