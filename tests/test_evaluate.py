"""`cdp-fast eval`: result schema, attack semantics, errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from cdp_fast.evaluate import EvalConfig, evaluate, resolve_precision, run


def linear_model(seed=0, c=1, h=5, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * h, classes)).eval()


def data(n=21, c=1, h=5, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, h), generator=g, dtype=torch.uint8), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("attack", ["pgd", "cw"])
def test_evaluate_schema_and_semantics(attack):
    model, (x, y) = linear_model(), data()
    r = evaluate(model, x, y, eps=0.05, attack=attack, steps=5, restarts=2, batch_size=8, device="cpu",
                 show_progress=False)
    assert {"clean_acc", "robust_acc", "attack", "eps", "n"} <= set(r)
    assert r["attack"] == attack and r["n"] == 21 and r["eps"] == 0.05
    assert 0.0 <= r["robust_acc"] <= r["clean_acc"] <= 1.0
    with torch.no_grad():
        clean = (model(x.float() / 255).argmax(1) == y).float().mean().item()
    assert r["clean_acc"] == pytest.approx(clean)
    # eps = 0: the attack cannot move the input, robust == clean
    r0 = evaluate(model, x, y, eps=0.0, attack=attack, steps=3, device="cpu", show_progress=False)
    assert r0["robust_acc"] == pytest.approx(r0["clean_acc"])
    # a huge eps fools a linear model on every example
    r1 = evaluate(model, x, y, eps=1.0, attack=attack, steps=10, step_size=0.25, device="cpu", show_progress=False)
    assert r1["robust_acc"] == 0.0


def test_deterministic_and_batching():
    model, (x, y) = linear_model(seed=2), data(n=13)
    a = evaluate(model, x, y, eps=0.03, steps=4, batch_size=5, device="cpu", seed=4, show_progress=False)
    b = evaluate(model, x, y, eps=0.03, steps=4, batch_size=5, device="cpu", seed=4, show_progress=False)
    c = evaluate(model, x, y, eps=0.03, steps=4, batch_size=13, device="cpu", seed=4, show_progress=False)
    assert (a["clean_acc"], a["robust_acc"]) == (b["clean_acc"], b["robust_acc"])
    assert a["clean_acc"] == c["clean_acc"]


def test_run_writes_json(tmp_path):
    from cdp_fast import models

    torch.manual_seed(0)
    m = models.build("small-cnn", num_classes=10, in_channels=1, image_size=8)
    nn.init.normal_(m.head.weight, std=0.1)
    models.save(m, tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    res = run(EvalConfig(checkpoint=str(tmp_path / "ckpt"), data="digits", attack="pgd", steps=2, limit=17,
                         json=str(out), device="cpu"))
    saved = json.loads(out.read_text())
    assert saved["n"] == 17 and saved["eps"] == pytest.approx(0.1) and saved["attack"] == "pgd"
    for k in ("clean_acc", "robust_acc"):
        assert 0.0 <= saved[k] <= 1.0 and saved[k] == res[k]
    other = models.build("small-cnn", num_classes=7, in_channels=1, image_size=8)
    models.save(other, tmp_path / "other")
    with pytest.raises(ValueError, match="num_classes 7"):
        run(EvalConfig(checkpoint=str(tmp_path / "other"), data="digits", steps=1, limit=4, device="cpu"))


def test_errors(tmp_path):
    model, (x, y) = linear_model(), data()
    with pytest.raises(ValueError, match="attack"):
        evaluate(model, x, y, eps=0.1, attack="fgsm")
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, x, y[:-1], eps=0.1)
    with pytest.raises(ValueError, match="checkpoint"):
        run(EvalConfig(checkpoint=""))
    with pytest.raises(FileNotFoundError):
        run(EvalConfig(checkpoint=str(tmp_path / "nope"), device="cpu"))
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", torch.device("cpu"))


def test_autoattack_is_built_in_and_records_its_own_settings(tmp_path):
    # it used to need torchattacks (whose install replaced the user's torch) and wrote
    # "steps": 20, "restarts": 1 (PGD's settings) into its JSON
    model, (x, y) = linear_model(), data()
    r = evaluate(model, x, y, eps=0.1, attack="autoattack", device="cpu", show_progress=False,
                 aa_iters=5, aa_targets=9)
    assert r["attack_name"] == "AutoAttack (APGD-CE + APGD-T subset)"
    assert r["components"] == ["apgd-ce", "apgd-t"] and r["n_iter"] == 5
    assert r["n_target_classes"] == 3  # 4 classes: at most 3 targets
    assert "steps" not in r and 0.0 <= r["robust_acc"] <= r["clean_acc"] <= 1.0
    pgd = evaluate(model, x, y, eps=0.1, attack="pgd", steps=5, device="cpu", show_progress=False)
    assert r["robust_acc"] <= pgd["robust_acc"] + 1e-9 or r["robust_acc"] == 0


def test_eval_accepts_a_train_robust_run_folder(tmp_path, capsys):
    from cdp_fast import models

    torch.manual_seed(0)
    m = models.build("small-cnn", num_classes=10, in_channels=1, image_size=8)
    models.save(m, tmp_path / "run" / "best")
    models.save(m, tmp_path / "run" / "last")
    res = run(EvalConfig(checkpoint=str(tmp_path / "run"), data="digits", steps=1, limit=4, device="cpu"))
    assert res["checkpoint"] == str(tmp_path / "run" / "best")
    assert "best/" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):  # a folder that is neither still fails clearly
        run(EvalConfig(checkpoint=str(tmp_path / "empty"), data="digits", device="cpu"))
