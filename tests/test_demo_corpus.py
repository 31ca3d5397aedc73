"""The demo corpus builder's large pretraining set (`--pretrain large`), checked without downloading anything:
no dev-task package can enter it, the plan picks only allowed files, and a build's markers keep tasks/ intact."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import soundfile as sf

from jobs import make_demo_corpus as m


def wav(seconds: float, sr: int = 8000, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def test_no_dev_task_package_in_the_large_set():
    """The packages the tasks evaluate on or mix as backgrounds (and their relatives) are never pretraining
    sources, and the list of them is the tasks' real one."""
    assert set(m.TASK_PACKAGES) <= set(m.DEBS)  # the packages the tasks are built from
    units = m.large_units()
    packages = [p for ps in units.values() for p in ps]
    assert len(packages) == len(set(packages))
    for p in packages:
        assert p not in m.TASK_PACKAGES and not m.is_task_package(p), p
        assert p not in m.DEBS, p  # nothing the default build downloads for its tasks either
        assert not p.startswith(("espeak", "fluid-soundfont", "tuxpaint-stamps")), p  # the default pretrain/'s
    for relative in ("ufoai-music", "ufoai-data", "musescore-general-soundfont", "musescore-general-soundfont-lossless",
                     "colobot-common", "klettres", *m.TASK_PACKAGES):
        assert m.is_task_package(relative), relative
    assert {s.kind for s in m.LARGE_SOURCES} <= {"music", "mixed", "effects", "speech"}
    assert m.FLITE_TEXT in units and "flite" in units


def test_the_option_parses():
    args = m.parser().parse_args(["--out", "x", "--pretrain", "large", "--flite", "7"])
    assert (args.pretrain, args.flite) == ("large", 7)
    assert m.parser().parse_args(["--out", "x"]).pretrain == "default"  # `make demo` builds what it always did
    with pytest.raises(SystemExit):
        m.parser().parse_args(["--out", "x", "--pretrain", "huge"])


def test_segments():
    assert m.segment_count(0.5) == m.segment_count(m.LONG_SECONDS) == 1
    assert m.segment_count(m.LONG_SECONDS + 1) == 2
    for seconds in (46.0, 61.0, 100.0, 1755.0):
        n = m.segment_count(seconds)
        assert seconds / n <= m.SEGMENT_SECONDS and seconds / (n - 1) > m.SEGMENT_SECONDS


def test_the_plan_picks_only_allowed_files(tmp_path):
    """Symlinks, skipped directories, byte-identical copies (of an earlier file or of a dev-task source), files
    soundfile cannot read and non-audio files stay out; .pk3 members come in; long files are cut; targets unique."""
    a, b = tmp_path / "pkg-a", tmp_path / "pkg-b"
    for d in (a / "sounds" / "silence", a / "music", b):
        d.mkdir(parents=True)
    (a / "sounds" / "hello world.wav").write_bytes(wav(1.0))
    (a / "sounds" / "hello world.ogg").write_bytes(wav(1.2))  # same stem, another format
    (a / "sounds" / "zcopy.wav").write_bytes(wav(1.0))  # byte-identical to 'hello world.wav'
    (a / "sounds" / "link.wav").symlink_to(a / "sounds" / "hello world.wav")
    (a / "sounds" / "silence" / "quiet.wav").write_bytes(wav(2.0, freq=10))
    (a / "sounds" / "broken.ogg").write_bytes(b"OggS not really")
    (a / "sounds" / "notes.txt").write_text("not audio")
    (a / "music" / "long.wav").write_bytes(wav(100.0, sr=1000))
    (b / "task.wav").write_bytes(wav(1.5, freq=330))  # as if it were a KLettres recording
    with zipfile.ZipFile(b / "music.pk3", "w") as z:
        z.writestr("sound/cdtracks/track1.wav", wav(3.0, freq=550))
        z.writestr("gfx/readme.txt", "x")
    sources = (m.LargeSource("pkg-a", "mixed", "a", skip=("silence",)), m.LargeSource("pkg-b", "music", "b"))
    exclude = m.task_source_digests_of([b / "task.wav"])
    items, counts = m.large_plan({"pkg-a": a, "pkg-b": b}, sources, exclude=exclude)
    keys = [(i.package, i.key) for i in items]
    assert keys == [("pkg-a", "music/long.wav"), ("pkg-a", "sounds/hello world.ogg"),
                    ("pkg-a", "sounds/hello world.wav"), ("pkg-b", "music.pk3::sound/cdtracks/track1.wav")]
    assert counts == {"symlink": 1, "left_out": 1, "duplicate": 1, "task_source": 1, "unreadable": 1}
    targets = [t for i in items for t in i.targets]
    assert len(targets) == len(set(targets)) and all(t.endswith(".flac") and " " not in t for t in targets)
    assert items[0].targets == tuple(f"pkg-a/music/long_s{i:02d}.flac" for i in range(4))  # 100 s: 4 x 25 s
    assert [i.targets for i in items[1:]] == [("pkg-a/sounds/hello_world.flac",), ("pkg-a/sounds/hello_world_wav.flac",),
                                              ("pkg-b/music.pk3/sound/cdtracks/track1.flac",)]
    assert m.read_audio(b, items[3].key) == wav(3.0, freq=550)
    with pytest.raises(ValueError, match="dev-task"):
        m.large_plan({"klettres-data": a}, (m.LargeSource("klettres-data", "speech", "x"),))


def test_a_large_build_never_touches_tasks(tmp_path):
    """`.pretrain_set` says which set pretrain/large/ is: a default build removes it, a large build of another
    version rebuilds it; tasks/, the default pretrain/ and the corpus version stay."""
    build = tmp_path / "corpus"
    (build / "tasks" / "spoken_digit").mkdir(parents=True)
    (build / "tasks" / "spoken_digit" / "manifest.csv").write_text("path,label,split\n")
    (build / "pretrain" / "notes").mkdir(parents=True)
    (build / "pretrain" / "notes" / "note_00000.flac").write_bytes(b"x")
    (build / ".corpus_version").write_text(m.CORPUS_VERSION)
    m.clear_stale_build(build)  # the default build's version: kept
    m.clear_stale_pretrain(build, "default")
    assert not (build / ".pretrain_set").exists()  # a default build writes no new file

    m.clear_stale_pretrain(build, "large")
    assert (build / ".pretrain_set").read_text() == f"large-{m.LARGE_VERSION}"
    (build / "pretrain" / "large" / "x").mkdir(parents=True)
    (build / "pretrain" / "large" / "x" / "a.flac").write_bytes(b"x")
    m.clear_stale_build(build)
    m.clear_stale_pretrain(build, "large")  # the same set: kept
    assert (build / "pretrain" / "large" / "x" / "a.flac").exists()

    (build / ".pretrain_set").write_text("large-0")  # another version of the large set: rebuilt
    m.clear_stale_pretrain(build, "large")
    assert not (build / "pretrain" / "large").exists()
    (build / "pretrain" / "large").mkdir()
    m.clear_stale_pretrain(build, "default")  # back to the default set: pretrain/large/ goes
    assert not (build / "pretrain" / "large").exists() and not (build / ".pretrain_set").exists()
    assert (build / "tasks" / "spoken_digit" / "manifest.csv").exists()
    assert (build / "pretrain" / "notes" / "note_00000.flac").exists()
    assert (build / ".corpus_version").read_text() == m.CORPUS_VERSION


def test_dialog_lines():
    text = ('local a = _"Hello there, [b]Tux[/b], how are you?"\n'
            'b = _"Hi."\n'  # too short
            'c = _"You have %d circuits left in the bank."\n'  # a format string
            'd = _"He said \\"run\\" and we all ran away."\n')
    assert m.dialog_lines(text) == ["Hello there, Tux, how are you?", 'He said "run" and we all ran away.']
