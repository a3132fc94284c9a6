"""TEST ONLY stand-in for `babel.numbers` (tests/gpu_stubs/README.md)."""

from s2s_inert import module_getattr

__s2s_stub__ = True
__getattr__ = module_getattr("babel.numbers")
