"""The record of a sharded synthetic set, and ``cdp-fast verify``.

A ``generate`` output folder holds

- ``shard-NNNNN.npz``: the images (``image`` uint8 NHWC, ``label`` int64, ``confidence`` float32);
  each written atomically (temp file + rename) by the one process that owns it.
- ``manifest.d/shard-NNNNN.json``: one record per finished shard, written atomically by the
  process that wrote the shard, right after it: ``{"file", "index", "images", "bytes", "sha256",
  "seed", "label_counts", "fingerprint"}``. Records are the authority: every process writes only
  its own, so several ranks (or machines, on a shared filesystem) never overwrite each other's.
- ``manifest.json``: the merged view, rewritten atomically by rank 0 from the records while shards
  land (at most every few seconds) and at the end: ``{"format", "fingerprint", "n", "batch_size",
  "num_shards", "complete", "images", "shards": [record, ...]}`` (records sorted by index).
- ``generate.json``: the settings that determine the images and what was actually used (model,
  features, labeler provenance), with their fingerprint; written with the first shard.

A shard counts as present only when its record exists, carries the folder's fingerprint, and the
file's size and sha256 match it. ``verify(folder)`` lists every departure from that.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import field
from .utils import atomic_write_bytes, write_json

FORMAT = "cdp-fast-shards/1"
MANIFEST = "manifest.json"
RECORDS = "manifest.d"
SETTINGS = "generate.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.npz$")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npz"


def shard_index(name: str) -> int | None:
    """Index of a ``shard-NNNNN.npz`` file name, None for any other name."""
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


def shard_images(i: int, n: int, batch_size: int) -> int:
    """Images in shard ``i`` of an ``n``-image set cut in batches of ``batch_size``."""
    return max(0, min(batch_size, n - i * batch_size))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path):
    """Parsed JSON, or None when the file is missing or unreadable (never half-written: atomic)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_record(out: Path, i: int, *, images: int, seed: int, label_counts, fingerprint: str) -> dict:
    """Record shard ``i`` (already on disk) in ``manifest.d``; returns the record."""
    path = out / shard_name(i)
    rec = {"file": path.name, "index": i, "images": int(images), "bytes": path.stat().st_size,
           "sha256": file_sha256(path), "seed": int(seed), "label_counts": [int(c) for c in label_counts],
           "fingerprint": fingerprint}
    write_json(out / RECORDS / f"shard-{i:05d}.json", rec)
    return rec


def remove_record(out: Path, i: int) -> None:
    (out / RECORDS / f"shard-{i:05d}.json").unlink(missing_ok=True)


def record_names(out: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(out / RECORDS) if n.startswith("shard-") and n.endswith(".json"))
    except FileNotFoundError:
        return []


def read_records(out: Path, cache: dict[str, dict] | None = None) -> dict[int, dict]:
    """All readable records by shard index. ``cache`` (name -> record) avoids re-reading records
    already seen: a record never changes while a run is going (a bad one is removed before)."""
    recs = {}
    for name in record_names(out):
        rec = cache.get(name) if cache is not None else None
        if rec is None:
            rec = read_json(out / RECORDS / name)
            if not isinstance(rec, dict) or not isinstance(rec.get("index"), int):
                continue
            if cache is not None:
                cache[name] = rec
        recs[rec["index"]] = rec
    return recs


def check_shard(out: Path, rec: dict, expected_images: int | None = None) -> str | None:
    """What is wrong with a recorded shard (None: its file matches the record)."""
    path = out / rec.get("file", "?")
    if expected_images is not None and rec.get("images") != expected_images:
        return f"holds {rec.get('images')} images, this set needs {expected_images} there"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "listed in the manifest but missing"
    if size != rec.get("bytes"):
        return f"truncated or altered ({size} bytes, the manifest says {rec.get('bytes')})"
    if file_sha256(path) != rec.get("sha256"):
        return "corrupt (sha256 differs from the manifest)"
    return None


def write_manifest(out: Path, *, fingerprint: str, n: int, batch_size: int,
                   records: dict[int, dict]) -> dict:
    """Rewrite ``manifest.json`` (atomically) from the records of this set."""
    num = -(-n // batch_size)
    shards = [records[i] for i in sorted(records)
              if i < num and records[i].get("fingerprint") == fingerprint]
    images = sum(r["images"] for r in shards)
    doc = {"format": FORMAT, "fingerprint": fingerprint, "n": n, "batch_size": batch_size,
           "num_shards": num, "complete": len(shards) == num and images == n, "images": images,
           "shards": shards}
    # one line per shard: readable, and small for 100k shards
    head = json.dumps({k: v for k, v in doc.items() if k != "shards"}, indent=2)[:-2]
    rows = ",\n    ".join(json.dumps(r) for r in shards)
    text = f'{head},\n  "shards": [\n    {rows}\n  ]\n}}\n' if shards else json.dumps(doc, indent=2) + "\n"
    atomic_write_bytes(out / MANIFEST, text.encode())
    return doc


def set_problems(folder) -> list[str]:
    """Cheap check (names and the manifest only, no hashing) before a generate folder is read as a
    data set: an incomplete set, or an ``*.npz`` the manifest does not list (a folder reader would
    load its images too: duplicates or foreign images). Empty for a folder without a manifest."""
    out = Path(folder)
    m = read_json(out / MANIFEST) if out.is_dir() else None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return []
    problems = []
    if not m.get("complete"):
        problems.append(f"{out} is an incomplete set: its manifest records {m.get('images')} of {m.get('n')} "
                        f"images (an interrupted or failed generate; rerun it to finish)")
    listed = {r.get("file") for r in m.get("shards", []) if isinstance(r, dict)}
    stray = sorted(p.name for p in out.glob("*.npz") if p.name not in listed)
    if stray:
        problems.append(f"{out} holds {len(stray)} npz file(s) its manifest does not list ({', '.join(stray[:3])}"
                        f"{', ...' if len(stray) > 3 else ''}): their images would be read too; move them away "
                        f"(`cdp-fast verify {out}`)")
    return problems


def warn_set(folder, who: str = "") -> list[str]:
    """Print :func:`set_problems` as one-line warnings (of command ``who``); returns them. The set is
    still read: a warning, not a refusal, so a partial set can be used on purpose."""
    import sys

    problems = set_problems(folder)
    for line in problems:
        print(f"cdp-fast{' ' + who if who else ''}: warning: {line}", file=sys.stderr, flush=True)
    return problems


# What helps, per kind of problem `verify` finds.
_RERUN = "rerun the same generate command: it regenerates missing, truncated and corrupt shards"
_NOT_OURS = ("this folder is not (or no longer) one generate run's output: generate into a new --out "
             "(or `generate --force` to replace it)")


def verify(folder) -> tuple[list[str], list[str], dict]:
    """Check a generate folder: returns (problems, notes, facts). No problems = the folder holds
    exactly the set its manifest describes, every shard intact. ``facts["fixes"]`` says what helps."""
    problems, notes, facts, fixes = _verify(folder)
    return problems, notes, dict(facts, fixes=fixes)


def _verify(folder):
    out = Path(folder)
    problems: list[str] = []
    notes: list[str] = []
    fixes: list[str] = []

    def fix(text):
        if text not in fixes:
            fixes.append(text)

    if not out.is_dir():
        return [f"{out} is not a folder"], notes, {}, ["give the --out folder of a generate run"]
    settings = read_json(out / SETTINGS)
    manifest = read_json(out / MANIFEST)
    if not isinstance(settings, dict) or "fingerprint" not in settings:
        problems.append(f"{SETTINGS} is missing or unreadable: not a (finished) cdp-fast generate folder")
        fix(_NOT_OURS)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        problems.append(f"{MANIFEST} is missing or not a {FORMAT} manifest")
        fix(_RERUN + " and writes the manifest" if isinstance(settings, dict) and "fingerprint" in settings
            else _NOT_OURS)
        return problems, notes, {}, fixes
    fp = manifest.get("fingerprint")
    if isinstance(settings, dict) and settings.get("fingerprint") != fp:
        problems.append(f"{MANIFEST} (fingerprint {fp}) does not belong to the settings in {SETTINGS} "
                        f"({settings.get('fingerprint')})")
        fix(_NOT_OURS)
    n, bs = int(manifest.get("n", 0)), int(manifest.get("batch_size", 1))
    num = -(-n // bs)
    listed = {r["index"]: r for r in manifest.get("shards", []) if isinstance(r, dict) and "index" in r}
    records = {i: r for i, r in read_records(out).items() if r.get("fingerprint") == fp}
    for i in sorted(set(records) - set(listed)):
        notes.append(f"{shard_name(i)} is recorded in {RECORDS}/ but not yet in {MANIFEST} "
                     f"(an interrupted run: rerun generate to finish)")
    ok = ok_images = 0
    for i in range(num):
        rec = listed.get(i, records.get(i))
        if rec is None:
            problems.append(f"{shard_name(i)}: missing (not in the manifest)")
            fix(_RERUN)
            continue
        bad = check_shard(out, rec, shard_images(i, n, bs))
        if bad:
            problems.append(f"{shard_name(i)}: {bad}")
            fix(_RERUN)
        else:
            ok, ok_images = ok + 1, ok_images + int(rec["images"])
    for p in sorted(out.glob("*.npz")):
        i = shard_index(p.name)
        if i is None or i >= num or i not in listed and i not in records:
            problems.append(f"{p.name}: stray file, not part of the manifest's set (a folder reader "
                            f"would load it); move it away")
            fix("move the stray files out of the folder (generate does not touch files it did not record)")
    tmp = sorted(p.name for p in out.glob(".shard-*.tmp"))
    if tmp:
        notes.append(f"{len(tmp)} temporary file(s) of interrupted writes ({tmp[0]}, ...): harmless, "
                     f"removed by the next generate run")
    facts = {"folder": str(out), "fingerprint": fp, "n": n, "shards": num, "shards_ok": ok,
             "images_ok": ok_images}
    return problems, notes, facts, fixes


@dataclass
class VerifyConfig:
    folder: str = field("", help="the folder to check: a generate run's --out (also accepted as the "
                                 "first argument: cdp-fast verify OUT)")


def run(cfg: VerifyConfig) -> dict:
    if not cfg.folder:
        raise ValueError("give the folder to check: cdp-fast verify OUT")
    problems, notes, facts, fixes = _verify(cfg.folder)
    for line in notes:
        print(f"note: {line}")
    if problems:
        lines = "\n  ".join(problems)
        helps = "\n  ".join(fixes)
        raise ValueError(f"{cfg.folder}: {len(problems)} problem(s):\n  {lines}\nwhat helps:\n  {helps}")
    print(f"{cfg.folder}: OK, {facts['shards_ok']} shards, {facts['images_ok']} images, all intact")
    return facts
