"""`generate` at scale and under faults (CPU, a tiny random UNet): torchrun equals one process,
kill/resume, manifest + verify, disk errors, NaN, validation before writing, provenance."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cdp_fast import generate as gen
from cdp_fast import manifest as mf
from cdp_fast.cli import main as cli_main
from cdp_fast.diffusion_train import load_diffusion, save_diffusion
from cdp_fast.models.unet import UNet
from cdp_fast.utils import settings_fingerprint

SCHED = {"name": "cosine", "num_train_timesteps": 1000, "params": {}}
ROOT = Path(__file__).resolve().parents[1]


def _unet(num_classes):
    torch.manual_seed(0)
    m = UNet(in_channels=1, base_ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), image_size=8,
             dropout=0.0, num_classes=num_classes).eval()
    with torch.no_grad():
        for p in m.parameters():  # no zero-initialised layer: every image depends on every weight
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A class-conditional tiny diffusion checkpoint (no labeler needed)."""
    return save_diffusion(tmp_path_factory.mktemp("ck") / "dm", _unet(10), {"schedule": SCHED})


def _args(ckpt, out, *extra):
    return ["generate", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", "--n", "10",
            "--batch-size", "3", "--steps", "4", "--eta", "0.5", *extra]


def _shards(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("shard-*.npz"))}


def _env():
    env = dict(os.environ, CDP_FAST_QUIET="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _same_set(a, b):
    sa, sb = _shards(a), _shards(b)
    assert sorted(sa) == sorted(sb) and sa, (sorted(sa), sorted(sb))
    for k in sa:
        assert sa[k] == sb[k], f"{k} differs"
    ma, mb = (json.loads((Path(x) / "manifest.json").read_text()) for x in (a, b))
    assert ma["complete"] and ma["shards"] == mb["shards"]


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """The uninterrupted one-process run (guided, noisy steps) every other run must equal."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cli_main(_args(ckpt, out, "--guidance", "hnm", "--scale", "10", "--t-min", "0")) == 0
    return out


GUIDED = ("--guidance", "hnm", "--scale", "10", "--t-min", "0")


def test_one_process_writes_manifest_and_verifies(reference, capsys):
    m = json.loads((reference / "manifest.json").read_text())
    assert m["format"] == mf.FORMAT and m["complete"] and m["n"] == 10 and m["num_shards"] == 4
    assert [r["images"] for r in m["shards"]] == [3, 3, 3, 1]
    for r in m["shards"]:
        assert r["sha256"] == mf.file_sha256(reference / r["file"]) and r["seed"] == r["index"]
    s = json.loads((reference / "generate.json").read_text())
    assert s["fingerprint"] == m["fingerprint"] == settings_fingerprint({"settings": s["settings"],
                                                                          "used": s["used"]})
    assert s["used"]["labeler"].startswith("the class-conditional") and s["used"]["scale"] == 10.0
    assert s["used"]["model"]["class"] == "UNet" and len(s["used"]["model"]["weights_sha256"]) == 16
    capsys.readouterr()
    assert cli_main(["verify", str(reference)]) == 0
    assert "OK, 4 shards, 10 images" in capsys.readouterr().out


def test_torchrun_two_processes_equal_one_process_byte_for_byte(ckpt, reference, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cdp_fast", "--", *_args(ckpt, out, *GUIDED)]
    r = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_set(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["images_made"] == 10 and sum(summary["label_counts"]) == 10


def _slow_generate(args):
    """A generate subprocess whose shards take 0.4 s each, so a signal lands mid-run."""
    code = ("import sys, time\nimport cdp_fast.sampler as s\nf = s.DDIMSampler.sample\n"
            "s.DDIMSampler.sample = lambda *a, **k: (time.sleep(0.4), f(*a, **k))[1]\n"
            "from cdp_fast.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return subprocess.Popen([sys.executable, "-c", code, *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_records(out, k, proc, timeout=60):
    t0 = time.time()
    while len(mf.record_names(out)) < k:
        assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def test_sigkill_then_rerun_equals_uninterrupted(ckpt, reference, tmp_path):
    out = tmp_path / "killed"
    args = _args(ckpt, out, *GUIDED)
    proc = _slow_generate(args)
    _wait_records(out, 2, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= len(mf.record_names(out)) < 4 and not (out / "summary.json").exists()
    # nothing half-written is visible: every visible shard is a complete file
    for name in _shards(out):
        with np.load(out / name) as z:
            assert len(z["label"]) == 3, name
    assert cli_main(["verify", str(out)]) == 2  # incomplete, and says so
    assert cli_main(args) == 0
    _same_set(out, reference)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_say_how_to_resume(ckpt, reference, tmp_path, monkeypatch, capsys, sig, code):
    import cdp_fast.sampler as sm

    real, calls = sm.DDIMSampler.sample, []

    def sample(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)  # lands while the third shard is being sampled
        return real(self, *a, **k)

    monkeypatch.setattr(sm.DDIMSampler, "sample", sample)
    out = tmp_path / "stopped"
    args = _args(ckpt, out, *GUIDED)
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert sorted(_shards(out)) == ["shard-00000.npz", "shard-00001.npz"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or sig == signal.SIGINT
    assert cli_main(args) == 0
    _same_set(out, reference)


def test_truncated_shard_is_detected_and_regenerated(reference, ckpt, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    p = out / "shard-00002.npz"
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])
    (out / "shard-00007.npz").write_bytes(b"stray")
    capsys.readouterr()
    assert cli_main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "shard-00002.npz: truncated" in err and "shard-00007.npz: stray" in err, err
    # what helps, per problem: a rerun for the damaged shard, moving the stray file away
    assert "rerun the same generate command" in err and "move the stray files" in err
    assert cli_main(_args(ckpt, out, *GUIDED)) == 0
    err = capsys.readouterr().err  # a plain one-line message, not a Python warning with a source line
    assert "cdp-fast generate: " in err and "shard-00002.npz: truncated" in err and "Warning" not in err, err
    assert "what helps" not in err
    assert p.read_bytes() == good
    (out / "shard-00007.npz").unlink()
    assert cli_main(["verify", str(out)]) == 0


def test_unlisted_shard_is_ignored_with_a_warning(reference, ckpt, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    good = (out / "shard-00001.npz").read_bytes()
    (out / "manifest.d" / "shard-00001.json").unlink()  # as if killed between shard and record
    (out / "shard-00001.npz").write_bytes(b"garbage")
    assert cli_main(_args(ckpt, out, *GUIDED)) == 0
    err = capsys.readouterr().err
    assert "shard-00001.npz: not in the manifest" in err and "Warning" not in err, err
    assert (out / "shard-00001.npz").read_bytes() == good


def test_unwritable_output_is_a_clean_error(ckpt, tmp_path):
    # (through the API: the CLI's own config.json write is checked in test_cli)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "out"):
        cfg = gen.GenerateConfig(checkpoint=str(ckpt), out=str(out), n=3, batch_size=3, steps=2, device="cpu")
        with pytest.raises(ValueError, match="not a folder"):
            gen.generate(cfg)
    assert blocker.read_text() == "x"


def test_disk_full_leaves_no_partial_shard(ckpt, reference, tmp_path, monkeypatch, capsys):
    import cdp_fast.data.datasets as data_mod  # where the shard writer (_atomic_savez) lives

    real = data_mod.atomic_write_bytes
    calls = []

    def full(path, data):
        calls.append(path)
        if len(calls) == 2:  # the second shard: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(data_mod, "atomic_write_bytes", full)
    out = tmp_path / "full"
    args = _args(ckpt, out, *GUIDED)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "shard-00001.npz" in err and "rerun" in err
    assert sorted(_shards(out)) == ["shard-00000.npz"]
    assert _shards(out)["shard-00000.npz"] == _shards(reference)["shard-00000.npz"]
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(data_mod, "atomic_write_bytes", real)
    assert cli_main(args) == 0
    _same_set(out, reference)


class _NaNAfter(torch.nn.Module):
    """The tiny UNet, returning NaN from its ``k``-th call on."""

    def __init__(self, model, k):
        super().__init__()
        self.model, self.k, self.calls = model, k, 0

    def forward(self, x, t, y=None):
        self.calls += 1
        e = self.model(x, t, y)
        return e * float("nan") if self.calls >= self.k else e


def test_nan_in_a_batch_names_shard_step_and_timestep(ckpt, tmp_path):
    model, schedule, meta = load_diffusion(ckpt)
    out = tmp_path / "nan"
    cfg = gen.GenerateConfig(checkpoint=str(ckpt), out=str(out), n=6, batch_size=3, steps=4, device="cpu")
    # 4 steps per shard: call 7 is step 2 of shard 1 (timestep 250 of range(0, 1000, 250) reversed)
    with pytest.raises(ValueError, match=r"shard-00001.npz \(shard 1, seed 1\) not written: NaN/inf in the "
                                         r"sampler state after step 2 of 4 \(timestep t=250\)"):
        gen.generate(cfg, model=_NaNAfter(model, 7), schedule=schedule, meta=meta)
    assert sorted(_shards(out)) == ["shard-00000.npz"]
    # NaN in the very first batch: the folder is never created
    out2 = tmp_path / "nan2"
    cfg2 = gen.GenerateConfig(checkpoint=str(ckpt), out=str(out2), n=3, batch_size=3, steps=4, device="cpu")
    with pytest.raises(ValueError, match="shard-00000.npz"):
        gen.generate(cfg2, model=_NaNAfter(model, 1), schedule=schedule, meta=meta)
    assert not out2.exists()


def test_failed_generate_leaves_nothing_and_does_not_block_its_rerun(ckpt, tmp_path, capsys):
    out = tmp_path / "g"
    with pytest.raises(SystemExit):
        cli_main(_args(ckpt, out, "--steps", "0"))
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match="steps must be in"):  # needs the checkpoint: fails in generate()
        gen.generate(gen.GenerateConfig(checkpoint=str(ckpt), out=str(out), n=3, steps=5000, device="cpu"))
    assert not out.exists()
    assert cli_main(_args(ckpt, out, "--steps", "2")) == 0
    # a folder whose settings file has no shards behind it is not held against another run
    for p in out.glob("shard-*.npz"):
        p.unlink()
    assert cli_main(_args(ckpt, out, "--steps", "3")) == 0
    assert json.loads((out / "generate.json").read_text())["settings"]["steps"] == 3


def test_negative_scale_is_refused(ckpt, tmp_path, capsys):
    with pytest.raises(ValueError, match="scale must be >= 0"):
        gen.GenerateConfig(scale=-5.0)
    with pytest.raises(SystemExit):
        cli_main(_args(ckpt, tmp_path / "s", "--guidance", "hnm", "--scale", "-5"))
    assert "--scale must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_records_what_features_and_labeler_were_used(tmp_path):
    from cdp_fast import models

    model = _unet(None)
    torch.manual_seed(1)
    clf = models.build("small-cnn", num_classes=10, in_channels=1, image_size=8).eval()
    cfg = gen.GenerateConfig(out=str(tmp_path / "p"), n=4, batch_size=4, steps=3, guidance="hnm", scale=10.0,
                             t_min=0, device="cpu")  # features "identity", labeler None in the config
    from cdp_fast.schedules import NoiseSchedule

    sched = NoiseSchedule.from_name("cosine", 1000)
    meta = {"image_shape": [1, 8, 8], "num_classes": 10, "class_conditional": False}
    gen.generate(cfg, model=model, schedule=sched, meta=meta, features_model=clf.features, labeler=clf)
    used = json.loads((tmp_path / "p" / "generate.json").read_text())["used"]
    sha = gen.weights_sha256(clf)
    assert used["features"] == {"source": "object passed to generate()", "class": "SmallCNN.features",
                                "weights_sha256": sha}
    assert used["labeler"] == {"source": "object passed to generate()", "class": "SmallCNN",
                               "weights_sha256": sha}
    # the record is part of the fingerprint: another labeler may not resume this folder
    other = models.build("small-cnn", num_classes=10, in_channels=1, image_size=8).eval()
    with pytest.raises(ValueError, match="used.features, used.labeler"):
        gen.generate(cfg, model=model, schedule=sched, meta=meta, features_model=other.features, labeler=other)


def test_settings_fingerprint_is_the_pipeline_cache_key():
    import hashlib

    from cdp_fast.pipeline import _key

    d = {"b": 1, "a": [1, 2], "p": Path("x")}
    old = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert _key(d) == settings_fingerprint(d) == old  # existing pipeline caches stay valid


def test_progress_over_the_set_and_inside_each_shard(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CDP_FAST_QUIET", "0")
    assert cli_main(_args(ckpt, tmp_path / "p", "--n", "4")) == 0
    err = capsys.readouterr().err
    assert "sampling" in err and "4/4" in err, err  # the step bar inside a shard
    assert "generate (none, 1 proc)" in err and "img/s" in err and "4/4" in err, err


def test_one_sampling_run_per_process_across_shards(ckpt, reference, tmp_path, monkeypatch):
    """The run (static buffers, CUDA graphs on a GPU, the guidance run) is built once per process
    and restarted in place for every shard; the shards equal the reference run's bytes."""
    from cdp_fast import guidance, sampler

    built = {"run": 0, "guidance": 0}
    for mod, cls, key in ((sampler, "_Run", "run"), (guidance, "_GuidanceRun", "guidance")):
        real_init = getattr(mod, cls).__init__

        def counting(self, *a, _real=real_init, _key=key, **k):
            built[_key] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(getattr(mod, cls), "__init__", counting)
    out = tmp_path / "once"
    assert cli_main(_args(ckpt, out, *GUIDED)) == 0
    assert built == {"run": 1, "guidance": 1}, built  # 4 shards, one run
    assert _shards(out) == _shards(reference)


# ------------------------------------------------------------------------------------------------
# issue 21: no silent deletion, one --out rule, the guidance window, huge --n, verify's advice
def test_smaller_n_on_a_finished_set_is_refused_and_force_cuts_it(reference, ckpt, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    # the case: a smaller --n deleted finished shards with exit 0 and no message
    args = _args(ckpt, out, *GUIDED)
    args[args.index("--n") + 1] = "4"
    rc = cli_main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "a complete set of 10 images (4 shards)" in err and "--n 4" in err and "delete 2" in err, err
    assert "shorten 1" in err and "new --out" in err and "--force" in err, err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    # the same settings with the same or a larger --n are a resume: allowed
    assert cli_main(_args(ckpt, out, *GUIDED)) == 0
    # --force cuts the set down: the surviving full shards are kept byte for byte
    args[args.index("--n") + 1] = "6"
    assert cli_main([*args, "--force"]) == 0
    assert sorted(_shards(out)) == ["shard-00000.npz", "shard-00001.npz"]
    assert _shards(out)["shard-00000.npz"] == before["shard-00000.npz"]
    capsys.readouterr()
    assert cli_main(["verify", str(out)]) == 0


def test_other_settings_or_another_commands_folder_needs_force(reference, ckpt, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("x")
    capsys.readouterr()
    assert cli_main(_args(ckpt, out, *GUIDED, "--seed", "9")) == 2
    err = capsys.readouterr().err
    assert "made with other settings (seed differ)" in err and "--force" in err, err
    assert cli_main(_args(ckpt, out, *GUIDED, "--seed", "9", "--force")) == 0
    assert not (out / "notes.txt").exists()  # replaced, not mixed
    assert json.loads((out / "generate.json").read_text())["settings"]["seed"] == 9
    assert "force" not in json.loads((out / "config.json").read_text())
    # a folder holding another command's result (a diffusion checkpoint) is not written into
    capsys.readouterr()
    assert cli_main(_args(ckpt, ckpt, *GUIDED)) == 2
    assert "not a generate set" in capsys.readouterr().err
    assert not list(Path(ckpt).glob("shard-*"))


@pytest.mark.parametrize("window,msg", [(("--t-min", "2000"), "not below the model's T = 1000"),
                                        (("--t-min", "600", "--t-max", "500"), "window t_min <= t < t_max is empty"),
                                        (("--t-min", "990"), "holds none of the 4 sampled steps")])
def test_empty_guidance_window_is_refused(ckpt, tmp_path, capsys, window, msg):
    out = tmp_path / "w"
    try:
        rc = cli_main(_args(ckpt, out, "--guidance", "hnm", "--scale", "10", *window))
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and msg in err, err
    assert not out.exists()  # it used to run unguided and record guidance: hnm


def test_absurd_n_starts_sampling_at_once(ckpt, tmp_path, monkeypatch, capsys):
    """--n 1e12 looped over every shard index before sampling anything; now shard 0 starts at once."""
    class Stop(Exception):
        pass

    def first_shard(sampler, cfg, meta, i, **kw):
        raise Stop(i)

    monkeypatch.setattr(gen, "sample_shard", first_shard)
    with pytest.raises(Stop) as e:
        gen.generate(gen.GenerateConfig(checkpoint=str(ckpt), out=str(tmp_path / "big"), n=10**12,
                                        batch_size=3, steps=2, device="cpu"))
    assert e.value.args == (0,)
    assert "1000000000000 images in 333333333334 shard(s)" in capsys.readouterr().err


def test_labeler_at_chance_is_reported(tmp_path, capsys):
    """Issue 21: a labeler that puts every image in one class (an untrained or collapsed intermediate
    classifier) must not pass silently: a warning while sampling and in summary.json."""
    from cdp_fast import models
    from cdp_fast.schedules import NoiseSchedule

    model = _unet(None)
    clf = models.build("small-cnn", num_classes=10, in_channels=1, image_size=8).eval()
    last = [m for m in clf.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # every logit equal but class 3's: every image is labelled 3
        last.weight.zero_()
        last.bias.zero_()
        last.bias[3] = 1.0
    cfg = gen.GenerateConfig(out=str(tmp_path / "p"), n=24, batch_size=24, steps=2, device="cpu")
    sched = NoiseSchedule.from_name("cosine", 1000)
    meta = {"image_shape": [1, 8, 8], "num_classes": 10, "class_conditional": False}
    summary = gen.generate(cfg, model=model, schedule=sched, meta=meta, labeler=clf)
    assert "24 of 24 images (100%) are labelled class 3" in summary["warning"]
    assert "WARNING" in capsys.readouterr().err
    assert gen.degenerate_labels([5, 5, 5, 5]) is None and gen.degenerate_labels([19, 1]) is not None
