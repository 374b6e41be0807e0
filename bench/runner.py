"""Run the figures side by side in one process and write ``var/bench/latest.json``.

Every figure that needs a broker runs on a scratch platform (``bench.scratch``): a private
embedded broker in a temporary folder and, per figure, its own var folder and
topic namespace. The user's platform, broker and databases are never touched;
only the report and the model cache (``var/models``, shared with training, so
base models are converted once) live in the user's var folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from bench import learning, machine
from bench.learning import LearningSizes
from bench.figure import Figure
from bench.scratch import Scratch, environment
from shared.contracts.envelope import iso, utcnow
from shared.settings import Settings

# In the order they run: broker figures first, then the CPU-heavy training ones.
FIGURES = ("bus", "signing", "replay", "promotion", "serving", "trainer", "energy", "learning")


@dataclass(frozen=True)
class Sizes:
    bus_events: int
    bus_rounds: int
    signing_batches: int  # 64 events each
    signing_rounds: int
    replay_cycles: int  # 15 events each
    replay_rounds: int
    promotions: int
    promotion_warmup: int
    delivery_probes: int
    trainer_steps: int
    trainer_repeats: int
    energy_steps: int
    gpu_model: str
    gpu_steps: int
    gpu_batch: int
    gpu_seq_len: int
    serving_model: str
    serving_requests: int  # chat completions (and bare generate runs) of serving.generate
    serving_max_tokens: int
    serving_batches: int  # embeddings requests (and bare runs) of serving.embeddings
    serving_texts: int  # texts in each
    serving_swaps: int  # promotions of serving.swap
    serving_swap_warmup: int
    learning: LearningSizes


DEFAULT = Sizes(bus_events=5000, bus_rounds=5, signing_batches=50, signing_rounds=5, replay_cycles=150,
                replay_rounds=7, promotions=60, promotion_warmup=2, delivery_probes=30, trainer_steps=100,
                trainer_repeats=3, energy_steps=50, gpu_model="smollm2", gpu_steps=30, gpu_batch=16, gpu_seq_len=512,
                serving_model="smollm2", serving_requests=8, serving_max_tokens=64, serving_batches=8,
                serving_texts=32, serving_swaps=20, serving_swap_warmup=2, learning=learning.DEFAULT)
QUICK = Sizes(bus_events=200, bus_rounds=2, signing_batches=2, signing_rounds=1, replay_cycles=6, replay_rounds=1,
              promotions=4, promotion_warmup=1, delivery_probes=3, trainer_steps=4, trainer_repeats=1, energy_steps=5,
              gpu_model="tiny", gpu_steps=5, gpu_batch=4, gpu_seq_len=64, serving_model="tiny", serving_requests=3,
              serving_max_tokens=16, serving_batches=3, serving_texts=16, serving_swaps=4, serving_swap_warmup=1,
              learning=learning.QUICK)


def selected(only: Sequence[str] | None) -> list[str]:
    """The figures to run, in running order; a name that is no figure raises ValueError."""
    names = [n.strip() for item in (only or ()) for n in item.split(",") if n.strip()]
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        raise ValueError(f"no figure {', '.join(unknown)}; the figures are {', '.join(FIGURES)}")
    return [f for f in FIGURES if not names or f in names]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def run(only: Sequence[str] | None = None, *, quick: bool = False, gpu: bool = False, out: Path | None = None,
        model_cache: Path | None = None, announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the selected figures, write the report to ``out`` and return it."""
    names = selected(only)
    if gpu and not cuda_available():
        raise RuntimeError("--gpu: no CUDA GPU is present")
    say = announce or (lambda _line: None)
    home = Settings.from_env()  # read before any scratch environment is in place
    out = Path(out or home.var_dir / "bench" / "latest.json")
    model_cache = Path(model_cache or home.model_cache_dir)
    sizes = QUICK if quick else DEFAULT
    started_at, started = utcnow(), time.perf_counter()
    description = machine.describe()
    figures: list[Figure] = []
    with Scratch() as scratch:
        for name in names:
            begun = time.perf_counter()
            say(f"{name}: measuring")
            measured = _measure(name, scratch, sizes, model_cache, gpu)
            for figure in measured:
                say(f"{figure.name}: {_summary(figure)} ({time.perf_counter() - begun:.0f}s)")
            figures += measured
    if hasattr(os, "getloadavg"):
        description["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "machine": description,
        "started_at": iso(started_at),
        "duration_s": round(time.perf_counter() - started, 2),
        "options": {"quick": quick, "gpu": gpu, "only": names},
        "figures": [_finite(f.to_dict()) for f in figures],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{os.getpid()}")
    staging.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(staging, out)
    report["path"] = str(out)
    return report


def _measure(name: str, scratch: Scratch, sizes: Sizes, model_cache: Path, gpu: bool) -> list[Figure]:
    """One figure (or its variants); what cannot be measured is reported as such, never skipped."""
    from bench import bus, energy, promotion, replay, serving, signing, trainer

    if name == "bus":
        return [_guard(bus.NAME, "events/s", f"ratio >= {bus.TARGET}", lambda: _on(
            scratch, "bus", lambda s: bus.measure(s, sizes.bus_events, sizes.bus_rounds)))]
    if name == "signing":
        try:
            return signing.measure(sizes.signing_batches, sizes.signing_rounds)
        except Exception as exc:
            return [Figure.failed(n, signing.UNIT, signing.TARGETS[n], exc) for n in signing.NAMES]
    if name == "replay":
        try:
            with scratch.platform("replay") as settings:
                return replay.measure(settings, sizes.replay_cycles, sizes.replay_rounds)
        except Exception as exc:
            return [Figure.failed(n, "events/s", f"ratio >= {replay.TARGET}", exc) for n in replay.NAMES]
    if name == "promotion":
        return [_guard(promotion.NAME, "ms", f"p99 < {promotion.TARGET_P99_MS:.0f} ms", lambda: _on(
            scratch, "promotion", lambda s: promotion.measure(s, sizes.promotions, sizes.promotion_warmup,
                                                      sizes.delivery_probes),
            services=promotion.SERVICES, prepare=promotion.prepare))]
    if name == "serving":
        try:
            run = serving.ServingBench(sizes.serving_model, model_cache)
            with environment(serving.environment(sizes.serving_model)), \
                    scratch.platform("serving", services=serving.SERVICES, prepare=run.prepare) as settings:
                return run.measure(settings, requests=sizes.serving_requests, max_tokens=sizes.serving_max_tokens,
                                   batches=sizes.serving_batches, texts=sizes.serving_texts,
                                   swaps=sizes.serving_swaps, swap_warmup=sizes.serving_swap_warmup)
        except Exception as exc:
            return [Figure.failed(n, serving.UNITS[n], serving.TARGETS[n], exc) for n in serving.NAMES]
    if name == "trainer":
        figures = [_guard(trainer.NAME, "tokens/s", f"ratio >= {trainer.TARGET}",
                          lambda: trainer.measure(model_cache, steps=sizes.trainer_steps,
                                                  repeats=sizes.trainer_repeats))]
        if gpu:
            from bench import trainer_gpu

            for compiled in (False, True):
                figures.append(_guard(
                    f"{trainer_gpu.NAME}.compiled" if compiled else trainer_gpu.NAME, "tokens/s",
                    f"ratio >= {trainer_gpu.TARGET}",
                    lambda compiled=compiled: trainer_gpu.measure(
                        model_cache, model=sizes.gpu_model, steps=sizes.gpu_steps, batch=sizes.gpu_batch,
                        seq_len=sizes.gpu_seq_len, compile=compiled)))
        return figures
    if name == "learning":
        try:
            return learning.measure(model_cache, sizes.learning)
        except Exception as exc:
            return [Figure.failed(n, learning.UNITS[n], learning.TARGETS[n], exc) for n in learning.NAMES]
    if name == "energy":
        return [_guard(energy.NAME, "ms per step", f"ratio < {energy.TARGET}",
                       lambda: energy.measure(model_cache, steps=sizes.energy_steps))]
    raise ValueError(f"no figure {name!r}")


def _on(scratch: Scratch, figure: str, measure: Callable[[Settings], Figure], **platform) -> Figure:
    with scratch.platform(figure, **platform) as settings:
        return measure(settings)


def _guard(name: str, unit: str, target: str, measure: Callable[[], Figure]) -> Figure:
    try:
        return measure()
    except Exception as exc:  # one figure failing must not cost the others
        return Figure.failed(name, unit, target, exc)


def _summary(figure: Figure) -> str:
    from bench.report import number

    if figure.value is None:
        return figure.notes
    verdict = "met" if figure.passed else "missed"
    if figure.is_latency:
        return f"p50 {number(figure.p50, figure.unit)}, p99 {number(figure.p99, figure.unit)} ({figure.target}: {verdict})"
    return f"{number(figure.value, figure.unit)}, ratio {number(figure.ratio)} ({figure.target}: {verdict})"


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
