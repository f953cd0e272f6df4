"""The loss curve shows what metrics.jsonl holds: value against step, labelled, as a PNG."""

import matplotlib.figure
import pytest

from ferryman.core.training.metrics import MetricsLog, plot_losses, plot_metric


@pytest.fixture
def drawn(monkeypatch):
    """The figures saved while the test runs (the PNG alone cannot say what was drawn)."""
    figures = []
    save = matplotlib.figure.Figure.savefig

    def recording(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording)
    return figures


def test_loss_curve_plots_each_logged_step_against_its_loss(tmp_path, drawn):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step, loss in [(2, 3.0), (4, 2.5), (6, 1.25)]:  # logged every second step
        log.write({"step": step, "loss": loss, "lr": 0.1})
    png = plot_losses(log.read(), tmp_path / "loss.png")
    assert png == tmp_path / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [figure] = drawn
    [ax] = figure.axes
    [line] = ax.get_lines()
    assert list(line.get_xdata()) == [2, 4, 6] and list(line.get_ydata()) == [3.0, 2.5, 1.25]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "loss", "training loss")


def test_a_metric_plot_skips_records_without_the_key_and_keeps_its_labels(tmp_path, drawn):
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "lddt": 0.5}, {"step": 3, "lddt": 0.75}]
    plot_metric(records, tmp_path / "lddt.png", key="lddt", ylabel="lDDT-Cα", title="validation", ylim=(0, 1))
    [ax] = drawn[0].axes
    [line] = ax.get_lines()
    assert list(line.get_xdata()) == [2, 3] and list(line.get_ydata()) == [0.5, 0.75]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title(), ax.get_ylim()) == ("step", "lDDT-Cα", "validation", (0, 1))
    assert plot_metric(records, tmp_path / "none.png", key="tm", ylabel="TM", title="t") is None
    assert not (tmp_path / "none.png").exists()


def test_loss_plot_title_can_be_set(tmp_path, drawn):
    plot_losses([{"step": 1, "loss": 1.0}], tmp_path / "loss.png", title="finetune")
    assert drawn[0].axes[0].get_title() == "finetune"
