"""Progress bars for ``secondorder bench`` (tqdm): one bar per training run, inside an
overall bar when there are several runs; a one-line summary of each finished run.

On a terminal the bars redraw in place (ETA, rate); elsewhere (CI logs, pipes) there are
no bars, only the one-line summaries, so that logs stay short and readable. With no stream
there is no output at all.
"""

from __future__ import annotations

from typing import Any, TextIO


def _tqdm() -> Any:
    from tqdm import tqdm

    return tqdm


class Progress:
    """All progress output of one benchmark run."""

    def __init__(self, stream: TextIO | None, runs: int) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.outer = None
        self.bar: Any = None
        if self.tty and runs > 1:
            self.outer = _tqdm()(total=runs, desc="runs", unit="run", **self._common(0))

    def _common(self, position: int) -> dict[str, Any]:
        return dict(
            file=self.stream,
            position=position,
            dynamic_ncols=True,
            mininterval=0.25,
        )

    def start(self, label: str, steps: int) -> None:
        if not self.tty:
            return
        position = 1 if self.outer is not None else 0
        self.bar = _tqdm()(total=steps, desc=label, unit="step", leave=False,
                           **self._common(position))  # fmt: skip

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def loss(self, value: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{value:.4g}", refresh=False)

    def finish(self, summary: str) -> None:
        """Close the run's bar and print its one-line summary."""
        if self.stream is None:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        _tqdm().write(summary, file=self.stream)
        if self.outer is not None:
            self.outer.update(1)

    def note(self, text: str) -> None:
        if self.stream is not None:
            _tqdm().write(text, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.outer is not None:
            self.outer.close()
