"""Options that name a function: a built-in name, or the dotted path `package.module.function` of one's own.

`--model.sampling.sampler my_project.samplers.euler` (src/diffusion/samplers.py, `sample`) and the loss weighting of
src/diffusion/losses.py take such paths, so that a researcher adds a sampler or a weighting in their own file and
selects it by config alone, without editing `src/`. The module is imported as Python imports anything: it must
be on the Python path (the folder `python -m src.main` runs from is).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence


def config_error(message: str) -> ValueError:
    """A `src.errors.ConfigError`; imported here because src.errors imports Lightning and the math modules do not."""
    from src.errors import ConfigError

    return ConfigError(message)


def import_function(path: str, option: str, builtins: Sequence[str]) -> Callable:
    """The function that the dotted path `path` ("package.module.function") names.

    A one-line `ConfigError` naming `option` when `path` is neither one of `builtins` nor a dotted path, when its
    module does not import, or when the module has no callable of that name.
    """
    choices = f"choose one of {', '.join(builtins)}, or the dotted path package.module.function of your own"
    module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise config_error(f"{option} {path!r} is unknown; {choices}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise config_error(
            f"{option} {path!r}: cannot import {module_name} ({error}); {choices} (its package must be importable "
            "from the folder you run in)"
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise config_error(f"{option} {path!r}: {module_name} has no function {name!r}; {choices}")
    return function
