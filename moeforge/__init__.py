"""moeforge: the installed distribution's own package (the ``moeforge`` command and the config tree).

The training code keeps its top-level packages (``train``, ``model``, ``moe``, ...). What makes an
installed moeforge immune to a user's ``model.py`` or ``train.py`` in the working directory is the
entry point, not the package names: ``moeforge ...`` (a console script: its ``sys.path[0]`` is the
script's folder, never the working directory) and ``torchrun --no-python moeforge train ...``.
docs/install.md says why and how.
"""

from __future__ import annotations


def config_dir() -> str:
    """The Hydra config tree as a directory, found through the package (importlib.resources), so
    a wheel, an editable install and a checkout on ``sys.path`` all resolve it the same way: the
    wheel ships ``configs/`` as package data of ``moeforge``; in the repository
    ``moeforge/configs`` is a link to the top-level ``configs/`` folder."""
    from importlib.resources import files

    path = files(__name__) / "configs"
    if not path.is_dir():
        raise FileNotFoundError(f"moeforge's config tree is missing at {path}: reinstall moeforge "
                                "(pip install moeforge / pip install -e .)")
    return str(path)
