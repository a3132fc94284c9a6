"""TEST ONLY: an inert stand-in for a module MeloTTS imports but never calls on the Chinese path
(see tests/gpu_stubs/README.md). Every attribute is another Inert, every call returns one."""

from __future__ import annotations

from typing import Any, Iterator


class Inert(str):
    """A str (so f-strings and os.path.join work on it) whose attributes and calls are Inert."""

    def __new__(cls, name: str = "s2s-gpu-stub") -> "Inert":
        return super().__new__(cls, f"/nonexistent/{name}")

    def __getattr__(self, name: str) -> "Inert":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return Inert(name)

    def __call__(self, *args: Any, **kwargs: Any) -> "Inert":
        return Inert("called")

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __fspath__(self) -> str:
        return str.__str__(self)


def module_getattr(module: str):  # noqa: ANN201 - a module-level __getattr__
    def __getattr__(name: str) -> Inert:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(f"module {module!r} (s2s GPU-check stand-in) has no attribute {name!r}")
        return Inert(f"{module}.{name}")
    return __getattr__
