"""Benchmarks of the platform against the bare libraries it is built on.

Each figure measures one path of the platform side by side with a baseline on
the same machine, in the same run: the bus against raw aiokafka, projection
replay against raw consumption, the MNTP step against a bare torch + peft
loop, promotion latency through a registry process, and the energy meter's
cost per training step. ``python -m bench`` or ``neurons bench`` runs them and
writes ``var/bench/latest.json``.
"""
