"""Where training metrics go: a JSONL file, TensorBoard event files, PNG curves and a progress bar.

:class:`MetricsWriter` appends one JSON object per step to ``<log_dir>/metrics.jsonl`` (non-finite
values are written as ``NaN`` / ``Infinity``, which Python's ``json`` reads back), writes the same
scalars as TensorBoard events with ``tensorboardX`` (no TensorFlow needed) and, when asked, to
Weights & Biases, and on :meth:`plot` draws ``<log_dir>/curves.png``. A resumed run appends to the
same files after :meth:`~MetricsWriter.rewind` has dropped the steps it replays, so each step is
logged once.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import uuid
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import tqdm
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend to set

DEFAULT_PLOT_KEYS = ("loss", "rewards/margins", "rewards/accuracies")
REPORT_TO = ("tensorboard", "wandb")


class MetricsWriter:
    """Writes scalar metrics per step to ``log_dir``; use as a context manager or call :meth:`close`.

    ``report_to`` names where the scalars go besides ``metrics.jsonl``: ``"tensorboard"``,
    ``"wandb"`` (Weights & Biases, which needs ``pip install wandb``; ``WANDB_MODE=offline`` logs
    without an account), both, or ``"none"``. ``wandb_options`` go to ``wandb.init`` (``project``,
    ``name``, ``config``, ...); by default the project is ``jaxpref``, the W&B files go under
    ``log_dir``, and a resumed run continues the same W&B run (its id is kept in
    ``<log_dir>/wandb_run_id``).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        report_to: str | Sequence[str] = ("tensorboard",),
        plot_keys: Sequence[str] = DEFAULT_PLOT_KEYS,
        wandb_options: Mapping[str, Any] | None = None,
    ):
        if isinstance(report_to, str):
            report_to = () if report_to == "none" else (report_to,)
        unknown = sorted(set(report_to) - set(REPORT_TO))
        if unknown:
            raise ValueError(f"`report_to` takes {', '.join(REPORT_TO)} or 'none'; got {', '.join(unknown)}.")
        self.log_dir = pathlib.Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.log_dir / "metrics.jsonl"
        self.plot_path = self.log_dir / "curves.png"
        self.plot_keys = tuple(plot_keys)
        self._start(self._read())
        self._tensorboard = None
        if "tensorboard" in report_to:
            # Imported here: tensorboardX imports torch when it is installed, seconds on every import.
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(logdir=str(self.log_dir))
        self._wandb = self._init_wandb(wandb_options or {}) if "wandb" in report_to else None

    def _read(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl``; a last line without its newline (a write cut short by
        a kill) is left out."""
        if not self.jsonl_path.exists():
            return []
        lines = self.jsonl_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in lines]

    def _start(self, records: list[dict[str, Any]]) -> None:
        """Rewrites ``metrics.jsonl`` with ``records`` (atomically: a temporary file renamed) and
        opens it for appending; the plot starts from them."""
        temporary = self.jsonl_path.with_name(f".{self.jsonl_path.name}.tmp")
        temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
        os.replace(temporary, self.jsonl_path)
        self._history: dict[str, dict[int, float]] = {}  # key -> step -> value, for the plot
        for record in records:
            self._remember(record["step"], record)
        self._jsonl = open(self.jsonl_path, "a")

    def _init_wandb(self, options: Mapping[str, Any]):
        try:
            import wandb  # optional, and slow to import
        except ImportError:
            raise ImportError(
                "`report_to` includes 'wandb' but the wandb package is not installed: pip install wandb"
            ) from None
        id_path = self.log_dir / "wandb_run_id"
        if not id_path.exists():
            id_path.write_text(uuid.uuid4().hex[:16])
        run_id = id_path.read_text().strip()
        defaults = dict(project="jaxpref", dir=str(self.log_dir), id=run_id, resume="allow")
        run = wandb.init(**{**defaults, **options})
        # Steps as a logged value, not W&B's own counter, which refuses steps replayed after a resume.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

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
        if self._wandb is not None:
            self._wandb.log({"step": int(step), **values})
        self._remember(int(step), values)

    def rewind(self, step: int) -> None:
        """Forgets the steps after ``step``: a run resumed from the checkpoint of ``step`` logs
        them again, so ``metrics.jsonl`` and TensorBoard hold each step once (a W&B run's history
        cannot be rewritten: it gets the replayed steps as new rows)."""
        self._jsonl.close()
        self._start([record for record in self._read() if record["step"] <= step])
        if self._tensorboard is not None:
            from tensorboardX import SummaryWriter

            # purge_step hides the events of steps from `step + 1` on, in the earlier event files too.
            self._tensorboard.close()
            self._tensorboard = SummaryWriter(logdir=str(self.log_dir), purge_step=step + 1)

    def flush(self) -> None:
        """Puts the metrics logged so far on disk (the training loop calls it at every checkpoint)."""
        try:
            self._jsonl.flush()
        except OSError as error:  # a full disk: name the file
            raise OSError(error.errno, f"{self.jsonl_path}: {error.strerror}") from error
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
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ProgressBar:
    """Progress over training steps with the loss and tokens per second: a tqdm bar on a terminal;
    elsewhere (a log file, CI, captured output) one line per tenth of the run, or after
    ``interval_s`` without one, so a log stays short and still shows the run moving."""

    def __init__(
        self, num_steps: int, initial_step: int = 0, *, disable: bool = False, interval_s: float = 60.0
    ):
        self.num_steps, self.step, self.interval_s = num_steps, initial_step, interval_s
        self._bar = None
        self._lines = not disable and not sys.stderr.isatty()
        if not disable and not self._lines:
            self._bar = tqdm.tqdm(total=num_steps, initial=initial_step, unit="step", dynamic_ncols=True)
        self._every = max(1, -(-num_steps // 10))  # a line at every tenth of the steps
        self._start = self._last_line = time.perf_counter()

    def update(self, metrics: Mapping[str, float]) -> None:
        self.step += 1
        tokens_per_second = metrics.get("tokens_per_second", 0.0)
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", tokens_per_s=f"{tokens_per_second:.0f}", refresh=False
            )
            self._bar.update(1)
            return
        now = time.perf_counter()
        tenth = self.step % self._every == 0 or self.step == self.num_steps
        if self._lines and (tenth or now - self._last_line >= self.interval_s):
            self._last_line = now
            print(
                f"step {self.step}/{self.num_steps} ({self.step / self.num_steps:.0%}): loss "
                f"{metrics['loss']:.4f}, {tokens_per_second:.0f} tokens/s, "
                f"{tqdm.tqdm.format_interval(now - self._start)} elapsed",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
