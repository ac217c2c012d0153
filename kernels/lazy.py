"""Packages whose names are imported at first use (PEP 562): lecture_flash and lecture_flash.gpt
offer their names without importing torch until one is used."""
import importlib
import sys


def offer(package, offers):
    """(__getattr__, __dir__) for `package`, which offers the names of `offers` (name -> the
    submodule defining it) and its submodules, each imported when first asked for and kept."""
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if name in offers:
            value = getattr(importlib.import_module(f"{package}.{offers[name]}"), name)
        else:  # a submodule, as `import package.name` would give it
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(offers))

    return __getattr__, __dir__
