"""`rheo run` end to end as a subprocess: the tiny preset on a real clip, T2V, and bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import pytest

from support.pipekit import read_clip, write_audio_only

ROOT = Path(__file__).resolve().parents[2]


def rheo_run(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RHEO_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "run", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_rheo_run_tiny_preset_end_to_end(clip, tmp_path):
    out = tmp_path / "styled.mp4"
    r = rheo_run("--input", clip, "--output", out, "--prompt", "a red cat", "--preset", "tiny", "--size", "64x64",
                 "--steps", "2", "--seed", "5", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "tiny RANDOM model" in r.stderr  # said loudly
    assert "achieved" in r.stderr and "FPS" in r.stderr and "time to first frame" in r.stderr
    assert "24/24" in r.stderr  # the progress bar reached the end
    frames, fps = read_clip(out)
    assert frames.shape == (24, 64, 64, 3) and fps == Fraction(12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["styled.mp4"]


def test_rheo_run_t2v(tmp_path):
    out = tmp_path / "gen.mp4"
    r = rheo_run("--t2v", "--seconds", "1.5", "--output", out, "--prompt", "a blue sky", "--size", "64x48",
                 "--quiet", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (64, 48)
        assert sum(1 for _ in c.decode(s)) == 24  # 1.5 s at the default 16 fps


def _truncated(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])  # the moov box (at the end) is gone: a corrupt MP4


BAD_INPUTS = {
    "corrupt": (lambda clip, p: _truncated(clip, p), "in.mp4", "corrupt or unsupported"),
    "empty": (lambda clip, p: p.write_bytes(b""), "in.mp4", "is empty"),
    "audio-only": (lambda clip, p: write_audio_only(p), "in.m4a", "audio-only"),
    "unsupported-text": (lambda clip, p: p.write_text("not a video\n" * 40), "in.txt", "a text file, not a video"),
    "unsupported-subtitles": (
        lambda clip, p: p.write_text("1\n00:00:01,000 --> 00:00:02,000\nhello\n"),
        "in.srt",
        "no video stream",
    ),
    "missing": (lambda clip, p: None, "nothing.mp4", "does not exist"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line_and_no_output(kind, clip, tmp_path, capsys, monkeypatch):
    """One case as a real subprocess; the others call the same ``main`` in-process (each interpreter start costs
    seconds on the CI machine, and the input checks run before anything heavy is imported)."""
    make, name, message = BAD_INPUTS[kind]
    src = tmp_path / name
    make(clip, src)
    out = tmp_path / "out.mp4"
    before = set(tmp_path.iterdir())
    args = ("--input", src, "--output", out, "--prompt", "x", "--preset", "tiny", "--size", "64x64")
    if kind == "corrupt":
        r = rheo_run(*args, cwd=tmp_path)
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        from services.cli import main

        for key in [k for k in os.environ if k.startswith("RHEO_")]:
            monkeypatch.delenv(key)
        code = main(["run", *map(str, args)])
        stdout, stderr = capsys.readouterr()
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rheo run: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout
    assert set(tmp_path.iterdir()) == before  # no output, no temp file


def test_output_folder_missing_is_one_line_and_leaves_nothing(clip, tmp_path):
    r = rheo_run("--input", clip, "--output", tmp_path / "no" / "out.mp4", "--prompt", "x", "--size", "64x64",
                 "--quiet", cwd=tmp_path)  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("rheo run: error:")]
    assert errors == [f"rheo run: error: output folder {tmp_path / 'no'} does not exist"]
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_input_is_refused_before_anything(clip, tmp_path, capsys):
    """The same file under another spelling or a link is still the input: refused, the input untouched."""
    from services.cli import main

    src = tmp_path / "in.mp4"
    src.write_bytes(clip.read_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.mp4").symlink_to(src)
    for out in (src, tmp_path / "sub" / ".." / "in.mp4", tmp_path / "link.mp4"):
        code = main(["run", "--input", str(src), "--output", str(out), "--prompt", "x", "--preset", "tiny"])
        _, stderr = capsys.readouterr()
        assert code == 2 and stderr.strip().splitlines() == [
            f"rheo run: error: --output {out} is the input file: it would be overwritten; write elsewhere"], stderr
    assert src.read_bytes() == clip.read_bytes()


def test_rheo_run_vae_taehv_encodes_and_decodes_with_taehv(clip, tmp_path, capsys, monkeypatch):
    """`--vae taehv`: the tiny TAEHV both ways (in-process: an interpreter start costs seconds here)."""
    from encoder.taehv import TAEHVDecoder, TAEHVEncoder
    from services.cli import main

    for key in [k for k in os.environ if k.startswith("RHEO_")]:
        monkeypatch.delenv(key)
    calls = {"encode": 0, "decode": 0}
    for cls, name in ((TAEHVEncoder, "encode"), (TAEHVDecoder, "decode")):
        real = getattr(cls, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(cls, name, spy)
    out = tmp_path / "fast.mp4"
    code = main(["run", "--input", str(clip), "--output", str(out), "--prompt", "x", "--preset", "tiny",
                 "--size", "64x64", "--vae", "taehv", "--quiet"])
    assert code == 0, capsys.readouterr().err
    frames, _ = read_clip(out)
    assert frames.shape == (24, 64, 64, 3)
    assert calls["encode"] > 0 and calls["decode"] > 0
