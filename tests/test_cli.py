"""`musetalk-flow models …` and `generate`, run in-process through ``deployments.cli.main``."""

from __future__ import annotations

import json

import pytest

from deployments.cli import main
from tests.media import ffprobe

pytest_plugins = ["tests.fixtures_engine"]


def test_make_tiny_then_check(tmp_path, capsys):
    models = tmp_path / "models"
    assert main(["models", "make-tiny", str(models)]) == 0
    assert (models / "musetalkV15" / "unet.pth").is_file()
    assert json.loads((models / "tiny.json").read_text())["landmarks"] == "dlib"
    capsys.readouterr()
    assert main(["models", "check", str(models)]) == 0
    assert "all required model files present" in capsys.readouterr().out


def test_check_on_an_empty_dir_names_the_missing_files(tmp_path, capsys):
    assert main(["models", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "missing:" in err and "musetalkV15/unet.pth" in err
    assert "face-parse-bisent/79999_iter.pth" in err


def test_check_names_a_single_missing_file(tiny_models, tmp_path, capsys):
    import os
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_models, models, copy_function=os.symlink)
    (models / "whisper" / "preprocessor_config.json").unlink()
    assert main(["models", "check", str(models)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"missing: {models / 'whisper' / 'preprocessor_config.json'}"]


def test_generate_writes_the_output(tiny_models, media, tmp_path, capsys):
    out = tmp_path / "out" / "talk.mp4"
    out.parent.mkdir()
    rc = main(["generate", "--video", str(media.still), "--audio", str(media.short_speech), "--out", str(out),
               "--models", str(tiny_models), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4"])
    assert rc == 0
    assert out.is_file()
    codecs = sorted(s["codec_name"] for s in ffprobe(out)["streams"])
    assert codecs == ["aac", "h264"]
    printed = capsys.readouterr().out
    assert str(out) in printed and "10 frames" in printed and "avatar prepared" in printed


def test_generate_with_missing_models_exits_2_naming_the_file(media, tmp_path, capsys):
    rc = main(["generate", "--video", str(media.still), "--audio", str(media.short_speech),
               "--out", str(tmp_path / "x.mp4"), "--models", str(tmp_path / "none"),
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unet.pth" in err and "musetalk-flow models download" in err
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("argv", [["models"], ["generate", "--video", "v.mp4"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err
