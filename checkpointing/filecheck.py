"""Checking a step directory's files against the sizes a listing says they have (``verify``)."""

from __future__ import annotations

from typing import List, Mapping

from checkpointing import layout
from checkpointing.storage import Storage

CHUNK = 1 << 24


def check_listed_files(st: Storage, step_dir: str, sizes: Mapping[str, int], listed_in: str, *,
                       exact: bool, read: bool) -> List[str]:
    """Problems ([] = good) with the files ``sizes`` lists (relative path -> bytes): missing, another
    size (``exact``) or fewer bytes than listed, and with ``read`` unreadable to the end."""
    problems = []
    for rel, nbytes in sorted(sizes.items()):
        url = layout.join(step_dir, rel)
        try:
            size = st.size(url)
        except FileNotFoundError:
            problems.append(f"{rel}: missing (listed in {listed_in})")
            continue
        if (size != int(nbytes)) if exact else (size < int(nbytes)):
            problems.append(f"{rel}: {size} bytes, {listed_in} {'lists' if exact else 'needs'} {nbytes}")
            continue
        if read:
            try:
                got = 0
                with st.fs.open(st._p(url), "rb") as f:
                    while chunk := f.read(CHUNK):
                        got += len(chunk)
            except Exception as e:  # noqa: BLE001 - any read failure is the finding
                problems.append(f"{rel}: unreadable: {type(e).__name__}: {e}")
                continue
            if got != size:
                problems.append(f"{rel}: read {got} of {size} bytes")
    return problems
