"""Build the real-audio demo corpus and six labeled dev tasks from Debian packages (no internet needed
beyond the Debian archive): `python -m jobs.make_demo_corpus --out DIR_OR_S3`.

    OUT/pretrain/   unlabeled audio: Tux Paint's recorded sounds and narrations, notes rendered from
                    the FluidR3 soundfont, espeak-ng speech by voices that no dev task tests on
    OUT/tasks/instrument_family/   16 GM families; train FluidR3, valid TimGM6mb, test MuseScore
                    (a soundfont per split)
    OUT/tasks/spoken_digit/        'zero'..'nine' spoken by espeak-ng voices; a voice per split only
    OUT/tasks/spoken_language/     which of 20 languages' KLettres speaker says a letter or syllable
                    (real recordings, none of them in pretrain/); each recording in one split
    OUT/tasks/spoken_digit_noisy/  spoken_digit's voices and splits, 3-4 renderings a digit, each over
                    an excerpt of a recorded game sound (UFO:AI, Colobot) at -5..5 dB SNR
    OUT/tasks/spoken_language_noisy/  spoken_language's recordings (up to 120 a language), each mixed
                    twice over backgrounds at -5..5 dB SNR
    OUT/tasks/instrument_family_noisy/  instrument_family's soundfont-per-split plan (4 keys in test)
                    over backgrounds at -5..5 dB SNR
    The noisy tasks' backgrounds are each in one split (by a stable hash) and none is in pretrain/;
    every noisy task has a sources.csv naming each clip's source group, background and SNR.

Every task's splits are disjoint by source group (soundfont, voice, recording, background), the same way for
valid as for test, and no valid/test source is in pretrain/.

`--pretrain large` adds OUT/pretrain/large/ (27 h): recorded music, effects and speech from 34 more Debian main
packages (LARGE_SOURCES: soundtracks, game sounds, telephone prompts in 5 languages, KTuberling's words in 23) and
flite speech, 16 kHz mono FLAC, long files cut into segments; never a package a dev task reads. tasks/ unchanged.

Idempotent: files already built (and objects already uploaded) are kept.  Packages are cached.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

DEBS = ["fluid-soundfont-gm", "musescore-general-soundfont-small", "timgm6mb-soundfont", "tuxpaint-stamps-default",
        "klettres-data", "ufoai-sound", "colobot-common-sounds",
        "espeak-ng", "espeak-ng-data", "libespeak-ng1", "libpcaudio0", "libsonic0", "libpulse0", "libsndfile1",
        "libasyncns0", "libflac12", "libvorbis0a", "libvorbisenc2", "libopus0", "libogg0", "libmpg123-0",
        "libmp3lame0"]
SR = 16000
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd"]
WORDS = ("the a of river morning light sound music quiet garden city rain window happy slowly under over "
         "yellow market train station table little bright cold warm evening paper story voice water friend "
         "house mountain open close green blue running walking listen speak small large early late").split()


CORPUS_VERSION = "3"  # 2: KLettres moved from pretrain/ to spoken_language, held-out voices, TimGM6mb valid
# 3: three noisy dev tasks (spoken_digit_noisy, spoken_language_noisy, instrument_family_noisy) over held-out
#    recorded game sounds; pretrain/ and the three earlier tasks unchanged


def clear_stale_build(build: Path) -> None:
    """Files are kept between builds; a build of another corpus version would leak sources across splits."""
    marker = build / ".corpus_version"
    if marker.exists() and marker.read_text().strip() == CORPUS_VERSION:
        return
    for sub in ("pretrain", "tasks"):
        if (build / sub).exists():
            say(f"removing {build / sub} (built by another corpus version)")
            shutil.rmtree(build / sub)


def say(msg: str) -> None:
    print(f"[demo corpus {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def download_packages(debs: Path, packages: list[str]) -> None:
    """apt-get download of the `packages` not yet in `debs` (no system install)."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        say(f"downloading {len(missing)} Debian packages ({', '.join(missing[:4])}…)")
        cmd = ["apt-get", "download", *missing]
        if subprocess.run(cmd, cwd=debs, capture_output=True).returncode != 0:
            say("apt-get update (package lists missing or stale)")
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            r = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"apt-get download failed: {r.stderr[-2000:]}")


def fetch_packages(cache: Path) -> Path:
    """apt-get download + dpkg -x into cache/root (no system install)."""
    debs, root = cache / "debs", cache / "root"
    download_packages(debs, DEBS)
    stamp = root / ".extracted"  # the debs extracted so far, one a line (a cache of an older DEBS grows)
    done = set(stamp.read_text().split()) if stamp.exists() else set()
    todo = [deb for deb in sorted(debs.glob("*.deb")) if deb.name not in done]
    if todo:
        say(f"extracting {len(todo)} packages")
        root.mkdir(parents=True, exist_ok=True)
        for deb in todo:
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
            done.add(deb.name)
            stamp.write_text("".join(f"{d}\n" for d in sorted(done)))
    return root


class Espeak:
    def __init__(self, root: Path):
        lib = root / "usr/lib/x86_64-linux-gnu"
        self.bin = root / "usr/bin/espeak-ng"
        self.data = lib / "espeak-ng-data"
        self.env = {**os.environ, "LD_LIBRARY_PATH": f"{lib}:{lib / 'pulseaudio'}"}
        self.variants = sorted(p.name for p in (self.data / "voices" / "!v").iterdir())

    def render(self, text: str, voice: str, speed: int, pitch: int, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp.wav")
        subprocess.run([str(self.bin), "--path", str(self.data), "-v", voice, "-s", str(speed), "-p", str(pitch),
                        "-w", str(tmp), text], env=self.env, check=True, capture_output=True)
        x, sr = sf.read(tmp, dtype="float32")
        tmp.unlink()
        write(out, x, sr)


def write(path: Path, x: np.ndarray, sr: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    sf.write(tmp, x, sr)
    os.replace(tmp, path)


class Notes:
    def __init__(self, sf_path: Path):
        import tinysoundfont
        self.synth = tinysoundfont.Synth(samplerate=SR)
        self.sfid = self.synth.sfload(str(sf_path))

    def render(self, program: int, key: int, velocity: int, seconds: float = 2.0, hold: float = 1.3) -> np.ndarray:
        s = self.synth
        s.program_select(0, self.sfid, 0, program)
        s.noteon(0, key, velocity)
        a = np.frombuffer(s.generate(int(hold * SR)), dtype=np.float32).copy()
        s.noteoff(0, key)
        b = np.frombuffer(s.generate(int((seconds - hold) * SR)), dtype=np.float32).copy()
        s.sounds_off()
        s.generate(SR // 10)  # flush release tails
        x = np.concatenate([a, b]).reshape(-1, 2).mean(axis=1)
        return x


def build_pretrain(root: Path, out: Path, espeak: Espeak, rng: np.random.Generator, n_notes: int,
                   n_speech: int, voices: list[str]) -> int:
    """Unlabeled audio; speech only by `voices` (none a dev task validates or tests on)."""
    dst = out / "pretrain"
    n = 0
    say("copying recorded sounds (Tux Paint stamps)")
    for src_dir, name in ((root / "usr/share/tuxpaint/stamps", "tuxpaint"),):
        for p in sorted(src_dir.rglob("*")):
            if p.suffix.lower() in (".ogg", ".wav", ".flac") and p.is_file():
                target = dst / name / p.relative_to(src_dir)
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, target)
                n += 1
    say(f"{n} recorded files; rendering {n_notes} soundfont phrases (FluidR3)")
    notes = Notes(root / "usr/share/sounds/sf2/FluidR3_GM.sf2")
    for i in range(n_notes):
        p = dst / "notes" / f"note_{i:05d}.flac"
        prog, key, vel = int(rng.integers(0, 128)), int(rng.integers(36, 85)), int(rng.integers(50, 127))
        if not p.exists():
            write(p, notes.render(prog, key, vel, seconds=3.0, hold=float(rng.uniform(0.5, 2.5))), SR)
        n += 1
    say(f"rendering {n_speech} spoken sentences (espeak-ng)")
    for i in range(n_speech):
        p = dst / "speech" / f"speech_{i:05d}.wav"
        voice = voices[int(rng.integers(len(voices)))]
        text = " ".join(rng.choice(WORDS, int(rng.integers(4, 10))))
        speed, pitch = int(rng.integers(120, 200)), int(rng.integers(25, 75))
        if not p.exists():
            espeak.render(text, voice, speed, pitch, p)
        n += 1
        if (i + 1) % 200 == 0:
            say(f"  speech {i + 1}/{n_speech}")
    return n


# instrument_family: one soundfont per split (the source group), so valid ranks what test measures
INSTRUMENT_PLAN = [("sf2/FluidR3_GM.sf2", "train", (48, 55, 62, 69)), ("sf2/TimGM6mb.sf2", "valid", (52, 65)),
                   ("sf3/MuseScore_General_Lite.sf3", "test", (50, 60, 71))]


def digit_voice_splits(voices: list[str], rng: np.random.Generator, n_voices: int) -> dict[str, list[str]]:
    """Voices (the source group) drawn for the spoken-digit task, 60/15/25 % to train/valid/test."""
    chosen = [voices[i] for i in rng.choice(len(voices), n_voices, replace=False)]
    n_train, n_valid = int(0.6 * n_voices), int(0.15 * n_voices)
    return {"train": chosen[:n_train], "valid": chosen[n_train:n_train + n_valid],
            "test": chosen[n_train + n_valid:]}


def language_splits(files: list[str], per_language: int = 60) -> list[tuple[str, str, str]]:
    """(file, language, split) for KLettres recordings `<lang>/<alpha|syllab>/<name>.ogg`: at most
    `per_language` per language, each recording (the source group) in one split by a stable hash."""
    import zlib
    by_lang: dict[str, list[str]] = {}
    for f in sorted(files):
        by_lang.setdefault(f.split("/")[0], []).append(f)
    rows = []
    for lang, fs in sorted(by_lang.items()):
        fs = sorted(fs, key=lambda f: zlib.crc32(f.encode()))[:per_language]
        for i, f in enumerate(fs):
            split = ("train", "train", "train", "valid", "test")[i % 5]
            rows.append((f, lang, split))
    return rows


def build_language_task(root: Path, out: Path) -> int:
    """Spoken-language identity from KLettres' real recordings (not in pretrain/)."""
    src = root / "usr/share/klettres"
    dst = out / "tasks" / "spoken_language"
    files = [p.relative_to(src).as_posix() for p in src.rglob("*.ogg") if p.parent.name in ("alpha", "syllab")]
    rows = []
    for f, lang, split in language_splits(files):
        name = f"{split}/{f.replace('/', '_')}"
        if not (dst / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / f, dst / name)
        rows.append((name, lang, split))
    (dst / "manifest.csv").write_text("path,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return len(rows)


def build_instrument_task(root: Path, out: Path) -> int:
    """16 GM families (program // 8), a soundfont per split."""
    dst = out / "tasks" / "instrument_family"
    rows = []
    for sf_path, split, keys in INSTRUMENT_PLAN:
        notes = Notes(root / "usr/share/sounds" / sf_path)
        for prog in range(128):
            for key in keys:
                name = f"{split}/p{prog:03d}_k{key}.wav"
                p = dst / name
                if not p.exists():
                    write(p, notes.render(prog, key, 100), SR)
                rows.append((name, f"family_{prog // 8:02d}", split))
    (dst / "manifest.csv").write_text("path,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return len(rows)


def build_digit_task(out: Path, espeak: Espeak, rng: np.random.Generator, splits: dict[str, list[str]]) -> int:
    """'zero'..'nine' by espeak-ng voices (accent + variant); speakers never cross splits."""
    dst = out / "tasks" / "spoken_digit"
    rows = []
    for j, (split, voice) in enumerate((s, v) for s in ("train", "valid", "test") for v in splits[s]):
        speed, pitch = int(rng.integers(130, 190)), int(rng.integers(30, 70))
        for word in DIGITS:
            name = f"{split}/v{j:03d}_{word}.wav"
            if not (dst / name).exists():
                espeak.render(word, voice, speed, pitch, dst / name)
            rows.append((name, word, split))
    (dst / "manifest.csv").write_text("path,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return len(rows)


# --- noisy and real-voice tasks (corpus version 3) ---------------------------------------------
# Backgrounds: recorded game sounds (UFO:AI ambience/weapons/machines, Colobot effects and music), none of
# them in pretrain/; each file in one split, so a test clip's background was never heard in train.
# Sounds with voices in them (UFO:AI soldiers, civilians, aliens) are left out: speech over speech blurs labels.
BACKGROUND_UFOAI = ("ambience", "weapons", "misc", "geoscape", "ugv", "doors", "seq", "impact", "footsteps")
SNR_DB = (-5.0, 5.0)  # clip-to-background power ratio over the clip's active frames, uniform per clip
# instrument_family_noisy: a soundfont per split as in instrument_family, four keys in test (512 clips)
INSTRUMENT_NOISY_PLAN = [("sf2/FluidR3_GM.sf2", "train", (48, 55, 62, 69)), ("sf2/TimGM6mb.sf2", "valid", (52, 65)),
                         ("sf3/MuseScore_General_Lite.sf3", "test", (50, 57, 64, 71))]


def stable_split(name: str, pattern: tuple[int, int] = (12, 15), of: int = 20) -> str:
    """train/valid/test of a source-group name by a stable hash: crc32 % `of` below pattern[0] train,
    below pattern[1] valid, else test (default 60/15/25 %)."""
    import zlib
    b = zlib.crc32(name.encode()) % of
    return "train" if b < pattern[0] else "valid" if b < pattern[1] else "test"


def background_splits(names: list[str]) -> dict[str, list[str]]:
    """Background files (the source group) -> split, 60/15/25 % by a stable hash of the name."""
    out: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for n in sorted(set(names)):
        out[stable_split("bg:" + n)].append(n)
    return out


def active_frames(x: np.ndarray, frame: int = 320, floor_db: float = 40.0) -> np.ndarray:
    """The 20 ms frames of `x` within `floor_db` of its loudest frame, concatenated (silence dropped)."""
    n = len(x) // frame
    if n == 0:
        return x
    f = x[:n * frame].reshape(n, frame)
    e = (f ** 2).mean(axis=1)
    return f[e >= e.max() * 10 ** (-floor_db / 10)].reshape(-1)


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float, offset: int) -> np.ndarray:
    """`clean` plus the excerpt of `noise` (looped when shorter) starting at `offset`, scaled so that the
    clean signal's active power over the excerpt's power is `snr_db`; the sum is scaled down if it clips."""
    n = len(clean)
    reps = -(-(offset % len(noise) + n) // len(noise))
    seg = np.tile(noise, reps)[offset % len(noise):offset % len(noise) + n].astype(np.float64)
    pc, pn = float((active_frames(clean) ** 2).mean()), float((seg ** 2).mean())
    if pn <= 0 or pc < 1e-10:  # -100 dBFS: nothing to hear
        raise ValueError("silent clean clip or background excerpt")
    y = clean + seg * np.sqrt(pc / (pn * 10 ** (snr_db / 10)))
    peak = float(np.abs(y).max())
    return (y * (0.99 / peak) if peak > 0.99 else y).astype(np.float32)


def load_backgrounds(root: Path) -> dict[str, np.ndarray]:
    """name -> mono 16 kHz float32 with silence dropped (at most 60 s a file), every file of 1 s or more."""
    import zipfile

    from service.audio import Skip, decode
    items: list[tuple[str, bytes]] = []
    with zipfile.ZipFile(root / "usr/share/games/ufoai/base/0snd.pk3") as z:
        for n in sorted(z.namelist()):
            parts = n.split("/")
            if len(parts) == 3 and parts[1] in BACKGROUND_UFOAI and n.endswith((".ogg", ".wav")):
                items.append((f"ufoai/{parts[1]}/{parts[2]}", z.read(n)))
    for sub in ("sounds", "music"):
        for f in sorted((root / "usr/share/games/colobot" / sub).glob("*")):
            if f.suffix in (".ogg", ".wav"):
                items.append((f"colobot/{sub}/{f.name}", f.read_bytes()))
    out = {}
    for name, data in items:
        try:
            x = decode(data, SR, min_seconds=1.0)
        except Skip:
            continue
        x = active_frames(x[:60 * SR])
        if len(x) >= SR:
            out[name] = x
    return out


class Mixer:
    """Mixes clips of one split with that split's backgrounds; every draw comes from `rng`, in clip order."""

    def __init__(self, backgrounds: dict[str, np.ndarray], rng: np.random.Generator):
        self.bg, self.rng = backgrounds, rng
        self.splits = background_splits(list(backgrounds))

    def draw(self, split: str) -> tuple[str, int, float]:
        names = self.splits[split]
        name = names[int(self.rng.integers(len(names)))]
        return name, int(self.rng.integers(len(self.bg[name]))), float(self.rng.uniform(*SNR_DB))

    def mix(self, clean: np.ndarray, draw: tuple[str, int, float]) -> np.ndarray:
        name, offset, snr = draw
        return mix_at_snr(clean, self.bg[name], snr, offset)


def build_noisy_digit_task(out: Path, espeak: Espeak, rng: np.random.Generator, splits: dict[str, list[str]],
                           mixer: Mixer, renditions: dict[str, int]) -> int:
    """spoken_digit's voices (held out of pretrain/ the same way), `renditions[split]` renderings of each digit
    per voice (speed and pitch drawn anew), each over a background excerpt of its split at the SNR_DB range."""
    dst = out / "tasks" / "spoken_digit_noisy"
    rows, sources = [], []
    tmp = dst / ".clean.wav"
    for j, (split, voice) in enumerate((s, v) for s in ("train", "valid", "test") for v in splits[s]):
        for r in range(renditions[split]):
            speed, pitch = int(rng.integers(120, 200)), int(rng.integers(25, 75))
            for word in DIGITS:
                draw = mixer.draw(split)
                name = f"{split}/v{j:03d}_r{r}_{word}.flac"
                if not (dst / name).exists():
                    espeak.render(word, voice, speed, pitch, tmp)
                    x, _ = sf.read(tmp, dtype="float32")
                    write(dst / name, mixer.mix(x, draw), SR)
                rows.append((name, word, split))
                sources.append((name, f"voice={voice};background={draw[0]};snr_db={draw[2]:.1f}"))
        if (j + 1) % 15 == 0:
            say(f"  spoken_digit_noisy: {j + 1}/{sum(len(v) for v in splits.values())} voices")
    tmp.unlink(missing_ok=True)
    _write_task(dst, rows, sources)
    return len(rows)


def _write_task(dst: Path, rows: list[tuple[str, str, str]], sources: list[tuple[str, str]]) -> None:
    """manifest.csv (what the probes read) and sources.csv (each clip's source group and background)."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "manifest.csv").write_text("path,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    (dst / "sources.csv").write_text("path,source\n" + "".join(f"{a},{b}\n" for a, b in sources))


def build_noisy_language_task(root: Path, out: Path, mixer: Mixer,
                              per_language: int = 120, mixes: int = 2) -> int:
    """spoken_language's KLettres recordings (up to `per_language` a language, the same recording-disjoint
    split: the first 60 of a language are exactly spoken_language's), each mixed `mixes` times over
    background excerpts of its split at the SNR_DB range."""
    from service.audio import Skip, decode
    src = root / "usr/share/klettres"
    dst = out / "tasks" / "spoken_language_noisy"
    files = [p.relative_to(src).as_posix() for p in src.rglob("*.ogg") if p.parent.name in ("alpha", "syllab")]
    rows, sources = [], []
    for f, lang, split in language_splits(files, per_language):
        draws = [mixer.draw(split) for _ in range(mixes)]
        names = [f"{split}/{f.replace('/', '_')[:-4]}_m{m}.flac" for m in range(mixes)]
        if not all((dst / n).exists() for n in names):
            try:
                x = decode((src / f).read_bytes(), SR, min_seconds=0.05)
            except Skip as e:
                say(f"  skipped {f}: {e}")
                continue
            for n, d in zip(names, draws):
                write(dst / n, mixer.mix(x, d), SR)
        for n, d in zip(names, draws):
            rows.append((n, lang, split))
            sources.append((n, f"recording={f};background={d[0]};snr_db={d[2]:.1f}"))
    _write_task(dst, rows, sources)
    return len(rows)


def build_noisy_instrument_task(root: Path, out: Path, mixer: Mixer) -> int:
    """instrument_family's 16 GM families and soundfont-per-split plan (INSTRUMENT_NOISY_PLAN), each note over a
    background excerpt of its split at the SNR_DB range."""
    dst = out / "tasks" / "instrument_family_noisy"
    rows, sources = [], []
    for sf_path, split, keys in INSTRUMENT_NOISY_PLAN:
        notes = None
        for prog in range(128):
            for key in keys:
                draw = mixer.draw(split)
                name = f"{split}/p{prog:03d}_k{key}.flac"
                if not (dst / name).exists():
                    notes = notes or Notes(root / "usr/share/sounds" / sf_path)
                    try:
                        write(dst / name, mixer.mix(notes.render(prog, key, 100), draw), SR)
                    except ValueError:  # a program this soundfont leaves silent at this key: no clip, no label
                        say(f"  instrument_family_noisy: {sf_path} program {prog} key {key} is silent, left out")
                        continue
                rows.append((name, f"family_{prog // 8:02d}", split))
                sources.append((name, f"soundfont={sf_path};background={draw[0]};snr_db={draw[2]:.1f}"))
    _write_task(dst, rows, sources)
    return len(rows)


# --- the large pretraining set (`--pretrain large`) ---------------------------------------------
# pretrain/large/<package>/: real recordings from Debian main packages (game and educational soundtracks, sound
# effects and ambiences, recorded speech) and pretrain/large/flite/ (flite speech, voices no task uses), added to
# the default pretrain/, which is kept as it is. Each file decoded to 16 kHz mono FLAC; one longer than
# LONG_SECONDS is cut into equal segments of at most SEGMENT_SECONDS. No package a dev task evaluates on or mixes
# as a background, nor a relative of one (TASK_FAMILIES), and no file byte-identical to a task source.
LARGE_VERSION = "1"  # the build's `.pretrain_set` marker reads "large-1"; bump it when LARGE_SOURCES changes
TASK_PACKAGES = ("klettres-data", "ufoai-sound", "colobot-common-sounds", "timgm6mb-soundfont",
                 "musescore-general-soundfont-small")
TASK_FAMILIES = ("klettres", "ufoai", "colobot", "timgm6mb", "musescore-general-soundfont")  # e.g. ufoai-music
SEGMENT_SECONDS, LONG_SECONDS = 30.0, 45.0
AUDIO_SUFFIXES, ARCHIVE_SUFFIXES = (".ogg", ".opus", ".wav", ".flac", ".mp3"), (".pk3",)


@dataclass(frozen=True)
class LargeSource:
    package: str
    kind: str  # music, mixed (music, effects and some voices), effects or speech
    what: str
    skip: tuple[str, ...] = ()  # directory names whose files are left out


LARGE_SOURCES = (
    LargeSource("warzone2100-music", "music", "Warzone 2100's three soundtrack albums"),
    LargeSource("planetblupi-music-ogg", "music", "Planet Blupi's music"),
    LargeSource("wesnoth-1.16-music", "music", "Battle for Wesnoth's orchestral music"),
    LargeSource("nexuiz-music", "music", "Nexuiz's electronic music (music.pk3)"),
    LargeSource("singularity-music", "music", "Endgame: Singularity's music"),
    LargeSource("drascula-music", "music", "Drascula's music (its six identical copies count once)"),
    LargeSource("asc-music", "music", "Advanced Strategic Command's music"),
    LargeSource("lordsawar-data", "music", "LordsAWar!'s music"),
    LargeSource("hedgewars-data", "mixed", "Hedgewars: music, effects, 15 voice packs (en, es, pl, ru, uk)"),
    LargeSource("supertux-data", "mixed", "SuperTux: music, effects, a few spoken lines"),
    LargeSource("megaglest-data", "mixed", "MegaGlest: music, unit voices and effects, nature ambiences"),
    LargeSource("marsshooter-data", "mixed", "M.A.R.S.: music, effects, announcer"),
    LargeSource("freedroidrpg-data", "mixed", "FreedroidRPG: music, effects, bot voices"),
    LargeSource("flare-game", "mixed", "Flare: music, environment and creature sounds"),
    LargeSource("hyperrogue-music", "mixed", "HyperRogue: music and effects"),
    LargeSource("ardentryst", "mixed", "Ardentryst: music, effects, monster sounds"),
    LargeSource("lincity-ng-data", "mixed", "LinCity-NG: music and city sounds"),
    LargeSource("frozen-bubble-data", "mixed", "Frozen Bubble: music and effects"),
    LargeSource("xmoto-data", "music", "X-Moto's music"),
    LargeSource("extremetuxracer-data", "mixed", "Extreme Tux Racer: music and effects"),
    LargeSource("wordwarvi-sound", "effects", "Word War vi: effects and music"),
    LargeSource("pinball-data", "effects", "Emilia Pinball: table sounds"),
    LargeSource("lugaru-data", "effects", "Lugaru: effects"),
    LargeSource("tuxmath-data", "effects", "Tux of Math Command: effects and music"),
    LargeSource("tuxtype-data", "effects", "Tux Typing: effects and a few words"),
    LargeSource("lmms-common", "effects", "LMMS: recorded instrument, drum and loop samples",
                skip=("waveforms", "shapes")),
    LargeSource("sonic-pi-samples", "effects", "Sonic Pi: recorded instrument, drum and loop samples"),
    *(LargeSource(f"asterisk-core-sounds-{lang}-wav", "speech", f"Asterisk's telephone prompts, {name}, 8 kHz",
                  skip=("silence",))
      for lang, name in (("en", "Allison (en-US)"), ("es", "Allison (es-MX)"), ("fr", "June (fr-CA)"),
                         ("it", "Carlo (it-IT)"), ("ru", "a Russian speaker"))),
    LargeSource("ktuberling-data", "speech", "KTuberling: words spoken in 23 languages"),
    LargeSource("kajongg", "speech", "Kajongg: tile names, 4 voices in English and German"),
)
FLITE_DEBS = ("flite", "libflite1", "libasound2")
FLITE_VOICES = {"kal16": 95.0, "awb": 125.0, "rms": 105.0, "slt": 165.0}  # voice -> its usual f0 (Hz)
FLITE_TEXT = "freedroidrpg-data"  # its dialogs' English lines are what flite says


def is_task_package(package: str) -> bool:
    """A package a dev task reads (or one of its relatives): never a pretraining source."""
    return package in TASK_PACKAGES or package.startswith(TASK_FAMILIES)


def large_units() -> dict[str, tuple[str, ...]]:
    """Extraction unit -> its packages: one per source, and flite with its libraries."""
    units = {s.package: (s.package,) for s in LARGE_SOURCES} | {"flite": FLITE_DEBS}
    bad = [p for ps in units.values() for p in ps if is_task_package(p)]
    if bad:
        raise ValueError(f"dev-task packages in the pretraining set: {bad}")
    return units


def fetch_large_packages(cache: Path) -> dict[str, Path]:
    """apt-get download + dpkg -x of each unit into its own cache/large/root/UNIT (a file's package is its unit)."""
    debs = cache / "large" / "debs"
    units = large_units()
    download_packages(debs, sorted({p for ps in units.values() for p in ps}))
    roots = {}
    for unit, packages in units.items():
        root = roots[unit] = cache / "large" / "root" / unit
        files = sorted(d for p in packages for d in debs.glob(f"{p}_*.deb"))
        stamp = root / ".extracted"
        if not stamp.exists() or stamp.read_text().split() != [d.name for d in files]:
            root.mkdir(parents=True, exist_ok=True)
            for deb in files:
                subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
            stamp.write_text("".join(f"{d.name}\n" for d in files))
    return roots


def segment_count(seconds: float) -> int:
    """Pieces a file of `seconds` is cut into: 1 up to LONG_SECONDS, else equal pieces of at most SEGMENT_SECONDS."""
    return 1 if seconds <= LONG_SECONDS else math.ceil(seconds / SEGMENT_SECONDS)


def package_audio(root: Path, skip: tuple[str, ...] = (), counts: Counter | None = None):
    """(key, bytes) of each audio file under `root` (key: its path) and each audio member of a .pk3 archive
    (key: ARCHIVE::MEMBER), sorted; symlinks and files in a directory named in `skip` are left out (counted)."""
    counts = Counter() if counts is None else counts
    for p in sorted(root.rglob("*")):
        rel, suffix = p.relative_to(root), p.suffix.lower()
        if suffix not in AUDIO_SUFFIXES + ARCHIVE_SUFFIXES or not (p.is_file() or p.is_symlink()):
            continue
        if p.is_symlink():
            counts["symlink"] += 1
        elif any(part in skip for part in rel.parts[:-1]):
            counts["left_out"] += 1
        elif suffix in AUDIO_SUFFIXES:
            yield rel.as_posix(), p.read_bytes()
        else:
            with zipfile.ZipFile(p) as z:
                for m in sorted(z.namelist()):
                    if m.lower().endswith(AUDIO_SUFFIXES):
                        yield f"{rel.as_posix()}::{m}", z.read(m)


def read_audio(root: Path, key: str) -> bytes:
    if "::" in key:
        archive, member = key.split("::", 1)
        with zipfile.ZipFile(root / archive) as z:
            return z.read(member)
    return (root / key).read_bytes()


TASK_AUDIO_DIRS = ("usr/share/klettres", "usr/share/games/ufoai", "usr/share/games/colobot")


def task_source_digests(root: Path) -> set[str]:
    """sha1 of every audio file of the packages the dev tasks read (KLettres' recordings, UFO:AI's sounds in
    0snd.pk3, Colobot's sounds and music), all of them, used by a task or not."""
    return task_source_digests_of([root / sub for sub in TASK_AUDIO_DIRS])


def task_source_digests_of(paths: list[Path]) -> set[str]:
    """sha1 of each audio file (and .pk3 member) under each directory of `paths`, or of each file in it."""
    out = set()
    for p in paths:
        if p.is_dir():
            out |= {hashlib.sha1(data).hexdigest() for _, data in package_audio(p)}
        elif p.is_file():
            out.add(hashlib.sha1(p.read_bytes()).hexdigest())
        else:
            raise SystemExit(f"{p} is missing: the dev tasks' packages must be extracted first")
    return out


@dataclass(frozen=True)
class LargeItem:
    package: str
    key: str  # path under the package's root, or ARCHIVE::MEMBER
    seconds: float  # from the header
    targets: tuple[str, ...]  # under pretrain/large/, one a segment


def large_plan(roots: dict[str, Path], sources: tuple[LargeSource, ...] | None = None,
               exclude: set[str] | frozenset[str] = frozenset()) -> tuple[list[LargeItem], Counter]:
    """Every audio file of each source's package, in a stable order, but symlinks, files in its `skip`
    directories, byte-identical copies of an earlier file or of a dev-task source (sha1 in `exclude`) and files
    whose header soundfile cannot read; what was dropped is counted by reason."""
    items, counts, seen, used = [], Counter(), set(), set()
    for src in LARGE_SOURCES if sources is None else sources:
        if is_task_package(src.package):
            raise ValueError(f"{src.package} is a dev-task source (or a relative): not for pretraining")
        for key, data in package_audio(roots[src.package], src.skip, counts):
            digest = hashlib.sha1(data).hexdigest()
            if digest in exclude:
                counts["task_source"] += 1
                continue
            if digest in seen:
                counts["duplicate"] += 1
                continue
            seen.add(digest)
            try:
                info = sf.info(io.BytesIO(data))
                seconds = info.frames / info.samplerate
            except Exception:
                seconds = 0.0
            if not seconds > 0:
                counts["unreadable"] += 1
                continue
            path = re.sub(r"^usr/share/(games/)?", "", key.replace("::", "/"))
            stem = f"{src.package}/{re.sub(r'[^A-Za-z0-9._/-]', '_', path.rsplit('.', 1)[0])}"
            if stem in used:  # same name, another format
                stem += "_" + path.rsplit(".", 1)[1].lower()
            used.add(stem)
            n = segment_count(seconds)
            targets = (f"{stem}.flac",) if n == 1 else tuple(f"{stem}_s{i:02d}.flac" for i in range(n))
            items.append(LargeItem(src.package, key, seconds, targets))
    return items, counts


def dialog_lines(text: str) -> list[str]:
    """The English lines of FreedroidRPG dialog scripts (`_"..."` strings), markup removed, 4 to 40 words."""
    out = []
    for m in re.finditer(r'_"((?:[^"\\]|\\.)*)"', text):
        s = " ".join(re.sub(r"\[/?\w+\]", "", m.group(1).replace("\\n", " ")).replace('\\"', '"').split())
        if 4 <= len(s.split()) <= 40 and re.search("[A-Za-z]{3}", s) and not re.search(r"[%$<>{}]", s):
            out.append(s)
    return out


def build_flite(root: Path, texts: list[str], dst: Path, rng: np.random.Generator, n: int) -> None:
    """`n` lines said by flite's voices (FLITE_VOICES), speed and pitch drawn anew each time."""
    from service.audio import decode
    lib = root / "usr/lib/x86_64-linux-gnu"
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib)}
    voices = sorted(FLITE_VOICES)
    tmp = dst / ".flite.wav"
    for i in range(n):
        voice, text = voices[int(rng.integers(len(voices)))], texts[int(rng.integers(len(texts)))]
        stretch, f0 = float(rng.uniform(0.8, 1.3)), FLITE_VOICES[voice] * float(rng.uniform(0.8, 1.3))
        p = dst / f"flite_{i:05d}.flac"
        if not p.exists():
            dst.mkdir(parents=True, exist_ok=True)
            subprocess.run([str(root / "usr/bin/flite"), "-voice", voice, "--setf", f"duration_stretch={stretch:.3f}",
                            "--setf", f"int_f0_target_mean={f0:.1f}", "-t", text, "-o", str(tmp)],
                           env=env, check=True, capture_output=True)
            write(p, decode(tmp.read_bytes(), SR), SR)
        if (i + 1) % 500 == 0:
            say(f"  flite {i + 1}/{n}")
    tmp.unlink(missing_ok=True)


def clear_stale_pretrain(build: Path, pretrain: str) -> None:
    """pretrain/large/ is the large set of one version (the build's `.pretrain_set` marker): a default build
    removes it (and the marker), a large build of another version rebuilds it. tasks/ and the rest of pretrain/
    are never touched, and a default build writes no marker."""
    marker, large = build / ".pretrain_set", build / "pretrain" / "large"
    want = f"large-{LARGE_VERSION}" if pretrain == "large" else "default"
    have = marker.read_text().strip() if marker.exists() else "default"
    if large.exists() and (want == "default" or have != want):
        say(f"removing {large} (the pretraining set {have}, not {want})")
        shutil.rmtree(large)
    if want == "default":
        marker.unlink(missing_ok=True)
    else:  # before anything is built: an interrupted large build is still marked as one
        build.mkdir(parents=True, exist_ok=True)
        marker.write_text(want)


def audio_hours(files) -> float:
    """Hours of the files soundfile can read (from their headers)."""
    total = 0.0
    for f in files:
        try:
            total += sf.info(str(f)).duration
        except Exception:
            pass
    return total / 3600


def build_large_pretrain(cache: Path, root: Path, out: Path, n_flite: int, rng: np.random.Generator) -> int:
    """pretrain/large/ (see LARGE_SOURCES), with sources.csv (each file's package, kind and seconds) and a
    summary by source; files already written are kept (`.done` lists the source files finished)."""
    from service.audio import SILENCE_PEAK, Skip, decode
    dst = out / "pretrain" / "large"
    roots = fetch_large_packages(cache)
    say("planning the large pretraining set (checksums against the dev tasks' packages)")
    items, counts = large_plan(roots, exclude=task_source_digests(root))
    done_path = dst / ".done"
    done = set(done_path.read_text().splitlines()) if done_path.exists() else set()
    todo = [it for it in items if f"{it.package}\t{it.key}" not in done]
    say(f"{len(items)} source files, {sum(it.seconds for it in items) / 3600:.1f} h "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))} left out); decoding {len(todo)}")
    dst.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    with done_path.open("a") as log:
        for i, it in enumerate(todo):
            try:
                x = decode(read_audio(roots[it.package], it.key), SR)
            except Skip as e:  # mostly effects under 0.25 s (too_short), what the pipeline would skip too
                skipped[e.reason] += 1
                x = np.zeros(0, np.float32)
            peak = float(np.abs(x).max()) if len(x) else 0.0
            x = x * (0.99 / peak) if peak > 0.99 else x  # resampling (or a lossy codec) overshoots: scale, not clip
            for target, seg in zip(it.targets, np.array_split(x, len(it.targets)) if len(x) else []):
                if len(seg) >= SR // 4 and np.abs(seg).max() > SILENCE_PEAK:
                    write(dst / target, seg, SR)
            log.write(f"{it.package}\t{it.key}\n")
            log.flush()
            if (i + 1) % 500 == 0:
                say(f"  decoded {i + 1}/{len(todo)}")
    if skipped:
        say(f"  not decoded: {', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))}")
    say(f"rendering {n_flite} lines with flite ({', '.join(sorted(FLITE_VOICES))})")
    texts = sorted(set(dialog_lines("\n".join(
        p.read_text(errors="replace") for p in sorted((roots[FLITE_TEXT] / "usr/share/freedroidrpg").rglob("*.lua"))))))
    build_flite(roots["flite"], texts, dst / "flite", rng, n_flite)
    kinds = {s.package: s.kind for s in LARGE_SOURCES} | {"flite": "speech (synthetic)"}
    rows = [(f.relative_to(dst).as_posix(), sf.info(str(f)).duration) for f in sorted(dst.rglob("*.flac"))]
    (dst / "sources.csv").write_text("path,package,kind,seconds\n" + "".join(
        f"{p},{p.split('/')[0]},{kinds.get(p.split('/')[0], '?')},{s:.3f}\n" for p, s in rows))
    by: dict[str, list[float]] = {}
    for p, s in rows:
        by.setdefault(p.split("/")[0], []).append(s)
    say("the large pretraining set, by source (files, hours):")
    for pkg, secs in sorted(by.items(), key=lambda kv: -sum(kv[1])):
        say(f"  {pkg:34s} {kinds.get(pkg, '?'):18s} {len(secs):6d} {sum(secs) / 3600:6.2f} h")
    base = {d: audio_hours(sorted((out / "pretrain" / d).rglob("*.*"))) for d in ("tuxpaint", "notes", "speech")}
    say(f"pretrain/large: {len(rows)} files, {sum(s for _, s in rows) / 3600:.2f} h; default parts: "
        + ", ".join(f"{d} {h:.2f} h" for d, h in base.items())
        + f"; pretrain/ in all {sum(s for _, s in rows) / 3600 + sum(base.values()):.2f} h")
    return len(rows)


def upload(local: Path, uri: str, endpoint: str | None) -> int:
    """Copy the tree to s3://bucket/prefix, skipping objects that already exist with the same size."""
    import boto3
    from concurrent.futures import ThreadPoolExecutor

    from service.storage import s3_endpoint
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint(endpoint))
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:
        s3.create_bucket(Bucket=bucket)
    have = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            have[o["Key"]] = o["Size"]
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and ".part" not in p.name]
    todo = [(p, f"{prefix}/{p.relative_to(local).as_posix()}".lstrip("/")) for p in files]
    wanted = {k for _, k in todo}
    stale = [k for k in have if k not in wanted and k[len(prefix):].lstrip("/").startswith(("pretrain/", "tasks/"))]
    for i in range(0, len(stale), 1000):  # objects of an older corpus version
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[i:i + 1000]]})
    if stale:
        say(f"removed {len(stale)} stale objects under {uri}")
    todo = [(p, k) for p, k in todo if have.get(k) != p.stat().st_size]
    say(f"uploading {len(todo)} of {len(files)} files to {uri}")
    done = 0

    def put(item):
        p, k = item
        s3.upload_file(str(p), bucket, k)

    with ThreadPoolExecutor(8) as pool:
        for _ in pool.map(put, todo):
            done += 1
            if done % 2000 == 0:
                say(f"  uploaded {done}/{len(todo)}")
    return len(files)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.make_demo_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="local dir or s3://bucket/prefix")
    p.add_argument("--cache", default="var/demo-cache", help="packages and the local build (reused)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default $AWS_ENDPOINT_URL)")
    p.add_argument("--notes", type=int, default=1500, help="soundfont phrases in the pretraining set")
    p.add_argument("--speech", type=int, default=1500, help="spoken sentences in the pretraining set")
    p.add_argument("--voices", type=int, default=60, help="voices in the spoken-digit task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain", choices=("default", "large"), default="default",
                   help="large: add pretrain/large/ (about 25 h of recorded music, effects and speech from 34 more "
                        "Debian packages, and flite speech); tasks/ stay exactly the same")
    p.add_argument("--flite", type=int, default=1500, help="flite lines in the large pretraining set")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    t0 = time.time()
    cache = Path(args.cache).resolve()
    remote = args.out.startswith("s3://")
    build = cache / "corpus" if remote else Path(args.out).resolve()
    root = fetch_packages(cache)
    clear_stale_build(build)
    clear_stale_pretrain(build, args.pretrain)
    espeak = Espeak(root)
    rng = np.random.default_rng(args.seed)
    voices = sorted({f"{a}+{v}" for a in ACCENTS for v in espeak.variants})
    digit_rng = np.random.default_rng(args.seed + 1)
    digit_voices = digit_voice_splits(voices, digit_rng, args.voices)
    held_out = set(digit_voices["valid"]) | set(digit_voices["test"])
    n_pre = build_pretrain(root, build, espeak, rng, args.notes, args.speech, [v for v in voices if v not in held_out])
    say("rendering the instrument-family task (FluidR3 train, TimGM6mb valid, MuseScore test)")
    n_inst = build_instrument_task(root, build)
    say("rendering the spoken-digit task (voice-disjoint)")
    n_dig = build_digit_task(build, espeak, digit_rng, digit_voices)
    say("copying the spoken-language task (KLettres recordings, recording-disjoint)")
    n_lang = build_language_task(root, build)
    say("loading the held-out backgrounds (UFO:AI and Colobot sounds, a file per split)")
    backgrounds = load_backgrounds(root)
    bg_splits = background_splits(list(backgrounds))
    say(f"{len(backgrounds)} backgrounds: " + ", ".join(
        f"{s} {len(v)} files / {sum(len(backgrounds[n]) for n in v) / SR / 60:.0f} min" for s, v in bg_splits.items()))
    say("rendering the noisy spoken-digit task (spoken_digit's voices over backgrounds)")
    n_dig_noisy = build_noisy_digit_task(build, espeak, np.random.default_rng(args.seed + 2), digit_voices,
                                         Mixer(backgrounds, np.random.default_rng(args.seed + 12)),
                                         {"train": 3, "valid": 3, "test": 4})
    say("mixing the noisy spoken-language task (KLettres recordings over backgrounds)")
    n_lang_noisy = build_noisy_language_task(root, build, Mixer(backgrounds, np.random.default_rng(args.seed + 3)))
    say("rendering the noisy instrument-family task (a soundfont per split, over backgrounds)")
    n_inst_noisy = build_noisy_instrument_task(root, build, Mixer(backgrounds, np.random.default_rng(args.seed + 4)))
    (build / ".corpus_version").write_text(CORPUS_VERSION)
    n_large = 0
    if args.pretrain == "large":  # after the tasks and the version marker: they are the default build's, unchanged
        say("building the large pretraining set (pretrain/large/)")
        n_large = build_large_pretrain(cache, root, build, args.flite, np.random.default_rng(args.seed + 20))
    if remote:
        upload(build, args.out, args.s3_endpoint)
    large = f" (+{n_large} in pretrain/large)" if args.pretrain == "large" else ""
    say(f"done in {time.time() - t0:.0f} s: {n_pre} pretraining files{large}, instrument_family {n_inst} clips, "
        f"spoken_digit {n_dig} clips, spoken_language {n_lang} clips, spoken_digit_noisy {n_dig_noisy} clips, "
        f"spoken_language_noisy {n_lang_noisy} clips, instrument_family_noisy {n_inst_noisy} clips -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
