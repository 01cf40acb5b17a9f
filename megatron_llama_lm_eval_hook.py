"""Makes the stock ``lm_eval`` command find model backends that packages declare under the
``lm_eval.models`` entry-point group, ``megatron_llama`` among them.

lm-evaluation-harness 0.4.x keeps a registry of model names, filled when ``lm_eval.models``
is imported, but does not look at other packages' entry points. Installing megatron_llama
puts a one-line ``.pth`` file in site-packages (see setup.py) that calls `install` when
Python starts. This module sits outside the ``megatron_llama`` package on purpose: importing
it at startup must not import the package, or a checkout in the current directory would be
shadowed by the installed copy. `install` it adds an import hook that waits for ``lm_eval.models`` and, right after
that module has run, registers each declared backend as a lazy placeholder. Nothing is
imported before then, and the backend itself (torch, megatron-core) only when a run asks
for it by name, so the cost to any other Python program is one dictionary lookup per
import. ``lm_eval --model megatron_llama --model_args checkpoint=DIR`` then works as with
lm-eval's own backends.
"""

from __future__ import annotations

import sys

GROUP = "lm_eval.models"
TRIGGER = "lm_eval.models"


def register_declared_models() -> list[str]:
    """Register every ``lm_eval.models`` entry point not yet in lm-eval's registry (as a
    placeholder lm-eval resolves on first use); returns the names added."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import model_registry

    added = []
    for point in entry_points(group=GROUP):
        if point.name not in model_registry:
            model_registry.register(point.name, target=point.value)
            added.append(point.name)
    return added


class _Loader:
    """Runs the real loader of ``lm_eval.models``, then registers the declared models."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            register_declared_models()
        except Exception as e:  # never break lm-eval itself over a plugin
            print(f"megatron_llama: could not register lm-eval backends ({e})", file=sys.stderr)

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        if name == "loader":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


class _Finder:
    """A meta-path finder that only answers for ``lm_eval.models``, by asking the finders
    after it and wrapping the loader they return."""

    tag = "megatron_llama lm_eval.models hook"  # one per interpreter, even across reloads

    def __init__(self):
        self.busy = False

    def find_spec(self, name, path=None, target=None):
        if name != TRIGGER or self.busy:
            return None
        self.busy = True  # the finders asked below may ask the meta path again
        try:
            for finder in sys.meta_path:
                if getattr(finder, "tag", None) == self.tag or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _Loader(spec.loader)
                    return spec
            return None
        finally:
            self.busy = False


def install() -> None:
    """Add the import hook once (called by the .pth file at interpreter start)."""
    if not any(getattr(f, "tag", None) == _Finder.tag for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    if TRIGGER in sys.modules:  # lm_eval.models already imported: register now
        try:
            register_declared_models()
        except Exception:
            pass
