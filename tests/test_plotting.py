import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from agentstate.plotting import format_step_count, plot_learning_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = Path(__file__).resolve().parents[1]


def learning_curves(n_points=20, n_streams=5, seed=0):
    rng = np.random.default_rng(seed)
    steps = np.linspace(0, 10_000_000, n_points)
    decay = 0.02 / np.sqrt(1 + steps / 1e6)[:, None]
    return steps, {
        "columnar": decay * rng.uniform(0.8, 1.2, size=(n_points, n_streams)),
        "ccn": 0.2 * decay * rng.uniform(0.8, 1.2, size=(n_points, n_streams)),
    }


def assert_readable_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes  # a drawn figure, not an empty canvas
    height, width, _ = imread(path).shape
    assert (width, height) == (8 * 150, 5 * 150)  # figsize (8, 5) inches at 150 dpi


@pytest.mark.parametrize(
    ("steps", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1k"),
        (2500, "2.5k"),
        (1e6, "1M"),
        (1_500_000, "1.5M"),
        (1.25e7, "12.5M"),
        (2e9, "2B"),
        (-3e6, "-3M"),
    ],
)
def test_format_step_count(steps, text):
    assert format_step_count(steps) == text


def test_plot_writes_a_png(tmp_path):
    steps, curves = learning_curves()
    out_path = tmp_path / "nested" / "folder" / "msre.png"
    returned = plot_learning_curve(
        steps,
        curves,
        str(out_path),
        title="Trace conditioning",
        reference_lines={"predict zero": 0.019, "bound": np.full(len(steps), 0.01)},
    )
    assert returned == out_path
    assert_readable_png(out_path)


def test_plot_handles_log_axis_nan_and_a_single_stream(tmp_path):
    steps, curves = learning_curves(n_streams=3)
    curves["columnar"][:4] = np.nan  # nothing reported yet
    curves["columnar"][5, 1] = np.nan
    curves["single seed"] = curves["ccn"][:, :1]
    path = plot_learning_curve(steps, curves, tmp_path / "log.png", title="log", logy=True)
    assert_readable_png(path)


def test_plot_draws_the_data(tmp_path):
    steps, curves = learning_curves()
    low = plot_learning_curve(steps, curves, tmp_path / "low.png", title="t")
    shifted = {name: values + 0.05 for name, values in curves.items()}
    high = plot_learning_curve(steps, shifted, tmp_path / "high.png", title="t")
    assert not np.array_equal(imread(low), imread(high))


BAD_INPUTS = [
    (
        {"steps": np.zeros((3, 2))},
        r"steps must have shape \[N\] with N >= 1; got shape \[3, 2\]",
    ),
    ({"steps": np.zeros(0)}, r"steps must have shape \[N\] with N >= 1; got shape \[0\]"),
    ({"curves": {}}, "curves must hold at least one named curve; got an empty mapping"),
    (
        {"curves": {"columnar": np.zeros((19, 5))}},
        r"curves\['columnar'\] must have shape \[N, B\] = \[20, B\] .*; got shape \[19, 5\]",
    ),
    (
        {"curves": {"columnar": np.zeros(20)}},
        r"curves\['columnar'\] must have shape \[N, B\] = \[20, B\] .*; got shape \[20\]",
    ),
    (
        {"reference_lines": {"predict zero": np.zeros(21)}},
        r"reference_lines\['predict zero'\] must be a number or have shape \[N\] = \[20\] "
        r".*; got shape \[21\]",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_plot_rejects_bad_input_before_writing(tmp_path, override, message):
    steps, curves = learning_curves()
    arguments = {"steps": steps, "curves": curves, "reference_lines": None} | override
    out_path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=message):
        plot_learning_curve(**arguments, out_path=out_path, title="bad")
    assert not out_path.exists()


@pytest.mark.expensive
def test_plot_needs_no_display_and_leaves_pyplot_alone(tmp_path):
    out_path = tmp_path / "headless.png"
    script = (
        "import sys; import numpy as np\n"
        "from agentstate.plotting import plot_learning_curve\n"
        f"plot_learning_curve(np.arange(3), {{'a': np.ones((3, 2))}}, {str(out_path)!r}, "
        "title='headless')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    headless_environment = {
        key: value for key, value in os.environ.items() if key not in ("DISPLAY", "MPLBACKEND")
    }
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=headless_environment,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
    assert out_path.read_bytes()[:8] == PNG_SIGNATURE
