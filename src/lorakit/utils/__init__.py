"""Utilities mirroring ``peft.utils``: hotswapping adapters in place (``lorakit.utils.hotswap``)."""
