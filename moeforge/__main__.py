"""``python -m moeforge <command> ...``: the ``moeforge`` command without its console script.

``python -m`` puts the working directory first on ``sys.path``, where a user's ``model.py`` or
``train.py`` would shadow ours; it is dropped here, before anything of ours is imported, unless
moeforge itself lives there (a checkout used without installing).
"""

import os
import sys


def _drop_working_directory() -> None:
    if not sys.path or sys.path[0] not in ("", os.getcwd()):
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.realpath(sys.path[0] or ".") != os.path.realpath(here):
        sys.path.pop(0)


_drop_working_directory()

from moeforge.cli import main  # noqa: E402  (after the path fix, on purpose)

if __name__ == "__main__":
    sys.exit(main())
