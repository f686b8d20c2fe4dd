"""Loading the package's optional compiled extensions (the search kernel, the fused selective scan).

Both are built by `pip install` next to the module that uses them (setup.py) and must be taken from exactly
that file: not through the import system, whose other finders (an editable install's among them) may resolve
the name elsewhere, and never from a cache or temp dir another user could write to.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType


def load_extension(name: str, package_dir: Path) -> ModuleType:
    """The extension module `name` (dotted, e.g. "tasks._scan_fp16") from its file in `package_dir`;
    ImportError when the install built none there."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        file = package_dir / f"{name.rpartition('.')[2]}{suffix}"
        if file.is_file():
            loader = importlib.machinery.ExtensionFileLoader(name, str(file))
            spec = importlib.util.spec_from_file_location(name, file, loader=loader)
            if spec is None:  # never with an explicit loader; satisfies the type checker
                raise ImportError(f"cannot load {file}")
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            return module
    raise ImportError(f"no {name} module file in {package_dir}")
