"""TEST ONLY stand-in for `fugashi` (tests/gpu_stubs/README.md): s2s's GPU check puts this folder on
PYTHONPATH only where the real package is not installed. Nothing in it works: every attribute and
call is inert."""

from s2s_inert import module_getattr

__s2s_stub__ = True
__getattr__ = module_getattr("fugashi")
