"""The progress display: tqdm's bar on a terminal, a plain line every few seconds when
stderr is a file or a pipe (CI, `make train > log 2>&1`), so a log stays short."""
import io

import pytest

from eosrl.launch.progress import LineProgress, progress_bar


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _simulate(seconds, steps_per_second=100, initial=0):
    """A run of `seconds` updating its display once a second, as the local launcher does."""
    clock, stream = _Clock(), io.StringIO()
    total = initial + seconds * steps_per_second
    bar = LineProgress(total, initial, "step", stream, clock=clock)
    for _ in range(seconds):
        clock.now += 1.0
        bar.set_postfix(sps=steps_per_second, eval="-", refresh=False)
        bar.update(steps_per_second)
    bar.close()
    return stream.getvalue()


@pytest.mark.parametrize("seconds,most_lines", [(400, 60), (24 * 3600, 400)])
def test_lines_in_a_file_are_plain_and_few(seconds, most_lines):
    text = _simulate(seconds)
    lines = text.splitlines()
    assert "\r" not in text
    assert 10 <= len(lines) <= most_lines, len(lines)
    assert all(line.startswith("progress: ") for line in lines)
    first, last = lines[0], lines[-1]
    assert first.startswith("progress: 1000/") and "100 step/s" in first and "0:00:10 elapsed" in first
    assert "left" in first and "sps=100 eval=-" in first  # the postfix the bar shows
    assert f"{seconds * 100}/{seconds * 100} steps (100%)" in last and "left" not in last


def test_a_resumed_run_counts_its_rate_from_where_it_started():
    lines = _simulate(60, initial=50_000).splitlines()
    assert lines[0].startswith("progress: 51000/56000 steps (91%), 100 step/s, 0:00:10 elapsed, 0:00:50 left")


def test_a_terminal_gets_the_bar_and_a_file_gets_lines():
    bar = progress_bar(100, stream=_Terminal())
    assert type(bar).__name__ == "tqdm"
    bar.close()
    assert isinstance(progress_bar(100, stream=io.StringIO()), LineProgress)


# `eosrl launch` into a pipe, its progress as plain lines: tests/test_distributed.py,
# test_launch_learns_cartpole (the same helper serves `eosrl train`).
