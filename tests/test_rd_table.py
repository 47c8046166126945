"""The one rate-distortion table formatter, as plain text and as Markdown."""

from svq_modules.lightning.table import format_rd_table

ROWS = [{"layer": 0, "bits": 4.0, "mse": 0.01, "psnr": 20.0}, {"layer": 1, "bits": 6.0, "mse": 0.005, "psnr": 23.0}]


def test_markdown_table_has_one_row_per_layer_and_the_flat_row():
    text = format_rd_table(ROWS, flat={"bits": 10.0, "mse": 0.004}, markdown=True)
    lines = text.splitlines()
    assert lines[0] == "| layer | bits/vec | MSE | PSNR dB |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| 0 | 4.000 | 1.0000e-02 | 20.00 |"
    assert lines[4] == "| flat | 10.000 | 4.0000e-03 | - |"  # a missing value prints as '-'
    assert len(lines) == 5


def test_plain_table_is_aligned():
    lines = format_rd_table(ROWS, title="t").splitlines()
    assert lines[0] == "t"
    assert len({len(line) for line in lines[1:]}) == 1  # header, rule and rows have one width
