"""Build the real-audio demo corpus and two labeled dev tasks from Debian packages (no internet needed
beyond the Debian archive): `python -m jobs.make_demo_corpus --out DIR_OR_S3`.

    OUT/pretrain/   unlabeled audio: Tux Paint's recorded sounds and narrations, KLettres' spoken
                    letters (23 languages), notes rendered from the FluidR3 soundfont, espeak-ng speech
    OUT/tasks/instrument_family/   16 GM families; train/valid rendered with FluidR3, test with the
                    MuseScore soundfont (soundfont-disjoint)
    OUT/tasks/spoken_digit/        'zero'..'nine' spoken by espeak-ng voices; voice-disjoint splits

Idempotent: files already built (and objects already uploaded) are kept.  Packages are cached.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

DEBS = ["fluid-soundfont-gm", "musescore-general-soundfont-small", "tuxpaint-stamps-default", "klettres-data",
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


def say(msg: str) -> None:
    print(f"[demo corpus {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fetch_packages(cache: Path) -> Path:
    """apt-get download + dpkg -x into cache/root (no system install)."""
    debs, root = cache / "debs", cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEBS if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        say(f"downloading {len(missing)} Debian packages ({', '.join(missing[:4])}…)")
        cmd = ["apt-get", "download", *missing]
        if subprocess.run(cmd, cwd=debs, capture_output=True).returncode != 0:
            say("apt-get update (package lists missing or stale)")
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            r = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"apt-get download failed: {r.stderr[-2000:]}")
    stamp = root / ".extracted"
    if not stamp.exists():
        say("extracting packages")
        root.mkdir(parents=True, exist_ok=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        stamp.write_text("ok")
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
                   n_speech: int) -> int:
    dst = out / "pretrain"
    n = 0
    say("copying recorded sounds (Tux Paint stamps, KLettres)")
    for src_dir, name in ((root / "usr/share/tuxpaint/stamps", "tuxpaint"),
                          (root / "usr/share/klettres", "klettres")):
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
        voice = f"{ACCENTS[int(rng.integers(len(ACCENTS)))]}+{espeak.variants[int(rng.integers(len(espeak.variants)))]}"
        text = " ".join(rng.choice(WORDS, int(rng.integers(4, 10))))
        speed, pitch = int(rng.integers(120, 200)), int(rng.integers(25, 75))
        if not p.exists():
            espeak.render(text, voice, speed, pitch, p)
        n += 1
        if (i + 1) % 200 == 0:
            say(f"  speech {i + 1}/{n_speech}")
    return n


def build_instrument_task(root: Path, out: Path) -> int:
    """16 GM families (program // 8); train/valid on FluidR3, test on MuseScore: soundfont-disjoint."""
    dst = out / "tasks" / "instrument_family"
    rows = []
    plan = [("FluidR3_GM.sf2", "sf2", "train", (48, 55, 62, 69)), ("FluidR3_GM.sf2", "sf2", "valid", (52, 65)),
            ("MuseScore_General_Lite.sf3", "sf3", "test", (50, 60, 71))]
    for sf_name, sub, split, keys in plan:
        notes = Notes(root / "usr/share/sounds" / sub / sf_name)
        for prog in range(128):
            for key in keys:
                name = f"{split}/p{prog:03d}_k{key}.wav"
                p = dst / name
                if not p.exists():
                    write(p, notes.render(prog, key, 100), SR)
                rows.append((name, f"family_{prog // 8:02d}", split))
    (dst / "manifest.csv").write_text("path,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return len(rows)


def build_digit_task(out: Path, espeak: Espeak, rng: np.random.Generator, n_voices: int = 60) -> int:
    """'zero'..'nine' by espeak-ng voices (accent + variant); speakers never cross splits."""
    dst = out / "tasks" / "spoken_digit"
    voices = sorted({f"{a}+{v}" for a in ACCENTS for v in espeak.variants})
    chosen = [voices[i] for i in rng.choice(len(voices), n_voices, replace=False)]
    n_train, n_valid = int(0.6 * n_voices), int(0.15 * n_voices)
    rows = []
    for j, voice in enumerate(chosen):
        split = "train" if j < n_train else "valid" if j < n_train + n_valid else "test"
        speed, pitch = int(rng.integers(130, 190)), int(rng.integers(30, 70))
        for word in DIGITS:
            name = f"{split}/v{j:03d}_{word}.wav"
            if not (dst / name).exists():
                espeak.render(word, voice, speed, pitch, dst / name)
            rows.append((name, word, split))
    (dst / "manifest.csv").write_text("path,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.make_demo_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="local dir or s3://bucket/prefix")
    p.add_argument("--cache", default="var/demo-cache", help="packages and the local build (reused)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint (default $AWS_ENDPOINT_URL)")
    p.add_argument("--notes", type=int, default=1500, help="soundfont phrases in the pretraining set")
    p.add_argument("--speech", type=int, default=1500, help="spoken sentences in the pretraining set")
    p.add_argument("--voices", type=int, default=60, help="voices in the spoken-digit task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.time()
    cache = Path(args.cache).resolve()
    remote = args.out.startswith("s3://")
    build = cache / "corpus" if remote else Path(args.out).resolve()
    root = fetch_packages(cache)
    espeak = Espeak(root)
    rng = np.random.default_rng(args.seed)
    n_pre = build_pretrain(root, build, espeak, rng, args.notes, args.speech)
    say("rendering the instrument-family task (FluidR3 train/valid, MuseScore test)")
    n_inst = build_instrument_task(root, build)
    say("rendering the spoken-digit task (voice-disjoint)")
    n_dig = build_digit_task(build, espeak, np.random.default_rng(args.seed + 1), args.voices)
    if remote:
        upload(build, args.out, args.s3_endpoint)
    say(f"done in {time.time() - t0:.0f} s: {n_pre} pretraining files, instrument_family {n_inst} clips, "
        f"spoken_digit {n_dig} clips -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
