"""Activation: patch OpenCLIP modules the moment they are imported, and only then.

The ``openclip_align.pth`` file installed into site-packages imports this package at interpreter
start-up (unless ``OPENCLIP_ALIGN_DISABLE=1``). Nothing heavy happens then: we only put a finder on
``sys.meta_path`` that wraps the loaders of the few OpenCLIP modules we extend, so that our patch
runs right after each of them has executed and before anybody does ``from module import name``.
Modules that are already imported when :func:`activate` is called are patched at once. Every patch
is idempotent, so calling :func:`activate` any number of times is safe.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import threading
from typing import Callable, Dict, List

ENV_SWITCH = "OPENCLIP_ALIGN_DISABLE"

# module name -> "package.module:function" patchers, resolved lazily so start-up imports nothing heavy
_ADAPTER = "openclip_align.integration.trainer_adapter"
_PATCHERS: Dict[str, List[str]] = {
    "open_clip": [
        "openclip_align.integration.factory_patch:patch_open_clip",
        f"{_ADAPTER}:patch_open_clip_trainer_api",
    ],
    "open_clip_train.params": [f"{_ADAPTER}:patch_params", f"{_ADAPTER}:patch_torch_save"],
    "open_clip_train.data": [f"{_ADAPTER}:patch_data"],
    "open_clip_train.train": [f"{_ADAPTER}:patch_train"],
    "open_clip_train.distributed": [f"{_ADAPTER}:patch_distributed"],
    "open_clip_train.file_utils": [f"{_ADAPTER}:patch_file_utils"],
}

_lock = threading.RLock()
_active = False


def _resolve(target: str) -> Callable:
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _run_patchers(module) -> None:
    for target in _PATCHERS.get(module.__name__, []):
        _resolve(target)(module)


class _PatchAfterExecLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs our patchers on the freshly executed module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _lock:
            _run_patchers(module)

    def __getattr__(self, name):  # get_code, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds specs through the other finders and wraps the loader of the modules we patch."""

    def __init__(self):
        self._searching = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PATCHERS:
            return None
        busy = getattr(self._searching, "names", set())
        if fullname in busy:
            return None
        self._searching.names = busy | {fullname}
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching.names = busy
        if spec is None or spec.loader is None or isinstance(spec.loader, _PatchAfterExecLoader):
            return spec
        spec.loader = _PatchAfterExecLoader(spec.loader)
        return spec


_finder = _PostImportFinder()


def activate() -> None:
    """Make the plugin's models, losses and trainer flags visible to OpenCLIP (idempotent)."""
    global _active
    with _lock:
        if not _active:
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            _active = True
        for name in list(_PATCHERS):
            if name in sys.modules:
                _run_patchers(sys.modules[name])


def is_active() -> bool:
    return _active
