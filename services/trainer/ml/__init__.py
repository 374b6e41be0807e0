"""The trainer's ML layer.

Modules that work without torch, transformers and peft: ``config``,
``placement`` (``resolve`` imports torch when called), ``models`` (its loaders
import them lazily), ``result``, ``rewards`` and ``fallback``. ``mntp``, ``rl``
and ``bench`` import torch at once, ``lora`` and ``checkpoint`` when called;
check ``fallback.ml_stack_available()`` first.
"""
