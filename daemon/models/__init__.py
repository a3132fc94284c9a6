"""Model directories: the store (assemble, record, verify), the s2s-models command line, the
online fetch plan, and the tiny random models the tests run (same on-disk layout as the real ones)."""
