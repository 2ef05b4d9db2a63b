"""Where training metrics go: a JSONL file, TensorBoard event files, PNG curves and a progress bar.

:class:`MetricsWriter` appends one JSON object per step to ``<log_dir>/metrics.jsonl`` (non-finite
values are written as ``NaN`` / ``Infinity``, which Python's ``json`` reads back), writes the same
scalars as TensorBoard events with ``tensorboardX`` (no TensorFlow needed), and on :meth:`plot`
draws ``<log_dir>/curves.png``. A resumed run appends to the same files; the plot takes the last
value logged for each step, so steps replayed after a restart are not drawn twice.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import tqdm
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend to set

DEFAULT_PLOT_KEYS = ("loss", "rewards/margins", "rewards/accuracies")


class MetricsWriter:
    """Writes scalar metrics per step to ``log_dir``; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        plot_keys: Sequence[str] = DEFAULT_PLOT_KEYS,
    ):
        self.log_dir = pathlib.Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.log_dir / "metrics.jsonl"
        self.plot_path = self.log_dir / "curves.png"
        self.plot_keys = tuple(plot_keys)
        self._history: dict[str, dict[int, float]] = {}  # key -> step -> value, for the plot
        if self.jsonl_path.exists():  # a resumed run: plot the earlier steps too
            for line in self.jsonl_path.read_text().splitlines():
                record = json.loads(line)
                self._remember(record.pop("step"), record)
        self._jsonl = open(self.jsonl_path, "a")
        self._tensorboard = None
        if tensorboard:
            # Imported here: tensorboardX imports torch when it is installed, seconds on every import.
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(logdir=str(self.log_dir))

    def _remember(self, step: int, metrics: Mapping[str, float]) -> None:
        for key in self.plot_keys:
            if key in metrics:
                self._history.setdefault(key, {})[step] = metrics[key]

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Logs ``metrics`` (name -> float) for ``step``."""
        values = {key: float(value) for key, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, int(step))
        self._remember(int(step), values)

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def plot(self) -> pathlib.Path | None:
        """Draws one panel per plotted metric into ``curves.png``; None when nothing was logged."""
        keys = [key for key in self.plot_keys if self._history.get(key)]
        if not keys:
            return None
        figure = Figure(figsize=(5 * len(keys), 3.5), layout="constrained")
        for axes, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys):
            points = sorted((s, v) for s, v in self._history[key].items() if math.isfinite(v))
            axes.plot([s for s, _ in points], [v for _, v in points])
            axes.set_title(key)
            axes.set_xlabel("step")
            axes.grid(alpha=0.3)
        figure.savefig(self.plot_path, dpi=100)
        return self.plot_path

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ProgressBar:
    """A tqdm bar over training steps showing the loss and tokens per second."""

    def __init__(self, num_steps: int, initial_step: int = 0, *, disable: bool = False):
        self._bar = tqdm.tqdm(
            total=num_steps, initial=initial_step, unit="step", dynamic_ncols=True, disable=disable
        )

    def update(self, metrics: Mapping[str, float]) -> None:
        self._bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            tokens_per_s=f"{metrics.get('tokens_per_second', 0.0):.0f}",
            refresh=False,
        )
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
