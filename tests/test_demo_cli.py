"""`facediff demo --stages`: an unknown stage is refused before anything is written."""

from typer.testing import CliRunner

from facediff.cli import app


def test_unknown_demo_stage_is_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--stages", "pixel,lora"])
    assert result.exit_code == 2
    assert "--stages: unknown or no stages ['lora']; choose from pixel, conditional, sd_lora, controlnet" in result.output
    assert not out.exists()
