"""s2s speech daemon: FunASR ASR and MeloTTS TTS served on ZeroMQ ROUTER sockets.

Importing this package is cheap: no torch, funasr or melo until main() loads engines.
"""

__version__ = "0.1.0"
