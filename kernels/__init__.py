"""The shared numerical kernels, installed as `bitplan.kernels` (DESIGN.md: never as a top-level `kernels`).

Python started in the repository root (`python -c`, a REPL, Jupyter) puts the root first on `sys.path`,
so `import kernels` finds this folder before the Hugging Face package of that name, which transformers
imports.  Imported under that top-level name, this module hands the name on to the next `kernels` on
the path, or fails as if this folder were not there; imported as `bitplan.kernels` it does nothing.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds after this runs
    _spec.loader.exec_module(_module)
