"""Before/after SASS evidence of a kernel change (issue 14): two compile-gate JSONs side by side.

    python -m cdp_fast.kernels._aot --evidence --json after.json        # on the changed tree
    python -m cdp_fast.benchmarks.sass_compare benchmarks/results/sass_before.json after.json \\
        --png benchmarks/results/sass_compare.png --md benchmarks/results/sass_compare.md

Both files come from the gate (``kernels/_aot.py``); these are static compile results, not speeds.
Units are matched by (op call, kernel, target): the gate records the same op calls on both trees,
and a kernel that exists on one side only (merged, split or new) shows "-" on the other. A
second table sums each op call over the kernels it launches (MUFU.EX2, instructions, tensor-core
instructions), which stays comparable when kernels are merged or split. Exit status 0, or 2 for
unreadable input.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cdp_fast.figures import _plt, _save, markdown_table

__all__ = ["compare_rows", "load", "main", "op_rows", "render_table", "write_figure"]

# column -> how a unit gives it (None: not in that unit, e.g. a JSON from before the SASS counters)
COLUMNS = {
    "regs": lambda u: u.get("regs"),
    "smem": lambda u: u.get("smem"),
    "spill B": lambda u: (u["spill_stores"] or 0) + (u["spill_loads"] or 0) + (u.get("local") or 0)
    if "spill_stores" in u else None,
    "MUFU.EX2": lambda u: u.get("MUFU_EX2"),
    "EX2/elem": lambda u: u.get("EX2_per_elem"),
    "insts": lambda u: u.get("insts"),
    "MMA": lambda u: u.get("HGMMA") if u.get("arch", 90) >= 90 else u.get("HMMA"),
}
SUMMED = ("MUFU.EX2", "insts", "MMA")   # per op call: summed over its kernels


def load(path) -> dict:
    """A compile-gate JSON (``_aot --json``); ValueError naming the file if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("units"), list):
        raise ValueError(f"{path}: no 'units' list: not a compile-gate JSON (python -m cdp_fast.kernels._aot --json)")
    return doc


def _short_case(case: str) -> str:
    # "hnm_loss bf16 d=128 pow2 hard plain" -> "hnm_loss bf16 d=128 hard plain": the size tag is noise
    return re.sub(r"\s+", " ", re.sub(r"\bpow2\b", "", case)).strip()


def _index(doc: dict) -> dict:
    """(op call, kernel, arch, n) -> unit for the units that compiled; n numbers the launches of one
    kernel by one op call (e.g. InfoNCE's rows kernel for dq and again for dk)."""
    out = {}
    for u in doc["units"]:
        if u.get("error"):
            continue
        for case in u.get("cases", []):
            n = 0
            while (_short_case(case), u["kernel"], u["arch"], n) in out:
                n += 1
            out[(_short_case(case), u["kernel"], u["arch"], n)] = u
    return out


def compare_rows(before: dict, after: dict) -> list[dict]:
    """One row per (kernel, target, unit pair): the cases it covers and every COLUMNS value before
    and after. Op calls that launch the same unit on both sides share one row."""
    b, a = _index(before), _index(after)
    rows: dict[tuple, dict] = {}
    for key in sorted(set(b) | set(a), key=lambda k: (k[0].split()[0], k[1], -k[2], k[0], k[3])):
        case, kernel, arch, n = key
        ub, ua = b.get(key), a.get(key)
        rk = (kernel, arch, n, id(ub), id(ua))
        if rk not in rows:
            rows[rk] = dict(kernel=kernel + (f" #{n + 1}" if n else ""), arch=arch, dtype=(ub or ua)["dtype"], cases=[],
                            before={c: (f(ub) if ub else None) for c, f in COLUMNS.items()},
                            after={c: (f(ua) if ua else None) for c, f in COLUMNS.items()},
                            only=None if ub and ua else ("before" if ub else "after"))
        rows[rk]["cases"].append(case)
    return list(rows.values())


def op_rows(before: dict, after: dict) -> list[dict]:
    """Per op call (case), the SUMMED columns over the kernels it launches, before and after."""
    out = []
    for side, doc in (("before", before), ("after", after)):
        for (case, _kernel, arch, _n), u in _index(doc).items():
            row = next((r for r in out if r["case"] == case and r["arch"] == arch), None)
            if row is None:
                row = dict(case=case, arch=arch, kernels={"before": [], "after": []},
                           before=dict.fromkeys(SUMMED), after=dict.fromkeys(SUMMED))
                out.append(row)
            row["kernels"][side].append(u["kernel"])
            for c in SUMMED:
                v = COLUMNS[c](u)
                if v is not None:
                    row[side][c] = (row[side][c] or 0) + v
    out.sort(key=lambda r: (r["case"].split()[0], -r["arch"], r["case"]))
    return out


def _cell(b, a) -> str:
    if b is None and a is None:
        return "-"
    if b is None or a is None:
        return f"{'-' if b is None else b} → {'-' if a is None else a}"
    if b == a:
        return f"{b}"
    ratio = f" ({a / b:.2f}x)" if b else ""
    return f"{b} → {a}{ratio}"


def render_table(before: dict, after: dict) -> str:
    """Markdown: the per-kernel table, then the per-op-call sums."""
    rows = compare_rows(before, after)
    head = ["kernel", "sm", "dtype", "op calls"] + list(COLUMNS)
    body = [[r["kernel"] + ("" if not r["only"] else f" ({r['only']} only)"), r["arch"], r["dtype"],
             "; ".join(r["cases"])] + [_cell(r["before"][c], r["after"][c]) for c in COLUMNS] for r in rows]
    ops = op_rows(before, after)
    ohead = ["op call", "sm", "kernels before", "kernels after"] + [f"Σ {c}" for c in SUMMED]
    obody = [[r["case"], r["arch"], " ".join(r["kernels"]["before"]) or "-",
              "same" if r["kernels"]["after"] == r["kernels"]["before"] else " ".join(r["kernels"]["after"]) or "-"]
             + [_cell(r["before"][c], r["after"][c]) for c in SUMMED] for r in ops]
    meta = (f"before: triton {before.get('triton', '?')}, targets {before.get('targets', '?')}; "
            f"after: triton {after.get('triton', '?')}, targets {after.get('targets', '?')}. "
            "Static SASS counts (one pass over the code), not a profile; EX2/elem = MUFU.EX2 of the "
            "column loop x threads / (BLOCK_R x BLOCK_C); MMA = HGMMA on sm_90, HMMA on sm_80.")
    return "\n\n".join([meta, markdown_table(body, head), markdown_table(obody, ohead)])


def _variant(case: str) -> str:
    # "hnm_loss bf16 d=128 hard bank" -> "hnm_loss hard bank"; DDIM: only the options that are set
    words = [w for w in case.split()[1:] if w not in ("fp32", "bf16", "fp16") and not w.startswith("d=")]
    words = [w for w in words if not w.endswith(("=False", "=none", "=float")) and not w.startswith("a_")]
    op = {"hnm_guided_ddim_update": "guided", "hnm_loss": "loss", "infonce_loss": "infonce",
          "ddim_update": "ddim"}.get(case.split()[0], case.split()[0])
    return " ".join([op] + words)[:48]


def write_figure(before: dict, after: dict, path) -> Path:
    """Horizontal bars, before vs after, per kernel row: MUFU.EX2, EX2 per entry, instructions."""
    plt = _plt()
    rows = compare_rows(before, after)
    labels = [f"{r['kernel'].strip('_').replace('_kernel', '')} sm{r['arch']} {r['dtype']} [{_variant(r['cases'][0])}"
              f"{' +' + str(len(r['cases']) - 1) if len(r['cases']) > 1 else ''}]" for r in rows]
    panels = [("MUFU.EX2", "MUFU.EX2 (static)"), ("EX2/elem", "MUFU.EX2 per tile entry"), ("insts", "SASS instructions")]
    h = 0.38
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 4.2 * len(panels), 1.4 + 0.3 * len(rows)), squeeze=False,
                             sharey=True)
    ys = list(range(len(rows)))
    for ax, (col, title) in zip(axes[0], panels):
        for off, side, color in ((-h / 2, "before", "#9aa5b1"), (h / 2, "after", "#1f77b4")):
            vals = [r[side][col] or 0 for r in rows]
            ax.barh([y + off for y in ys], vals, height=h, color=color, label=side)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"SASS before vs after (triton {after.get('triton', '?')}; static counts, not speed)")
    # room for the longest label (~0.055 in per character at 7 pt); tight_layout ignores shared y labels
    width = fig.get_size_inches()[0]
    fig.subplots_adjust(left=min(0.5, (0.3 + 0.055 * max(map(len, labels), default=10)) / width), right=0.99,
                        top=1 - 0.9 / fig.get_size_inches()[1], bottom=0.5 / fig.get_size_inches()[1], wspace=0.08)
    return _save(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cdp_fast.benchmarks.sass_compare",
                                 description="per-kernel SASS table and bar figure: compile-gate JSON before vs after")
    ap.add_argument("before", help="compile-gate JSON of the old tree (e.g. benchmarks/results/sass_before.json)")
    ap.add_argument("after", help="compile-gate JSON of the new tree (python -m cdp_fast.kernels._aot --evidence --json F)")
    ap.add_argument("--png", default=None, help="write the bar figure here")
    ap.add_argument("--md", default=None, help="also write the tables here (markdown)")
    ap.add_argument("--kernels", default=None, metavar="REGEX",
                    help="compare only these kernels (e.g. the after JSON of a gate run with the same --kernels)")
    args = ap.parse_args(argv)
    try:
        before, after = load(args.before), load(args.after)
        want = re.compile(args.kernels) if args.kernels else None
    except (ValueError, re.error) as e:
        print(f"sass_compare: {e}", file=sys.stderr)
        return 2
    if want is not None:
        before, after = ({**doc, "units": [u for u in doc["units"] if want.search(u["kernel"])]} for doc in (before, after))
        if not before["units"] and not after["units"]:
            print(f"sass_compare: --kernels {args.kernels!r} matches no unit of either file", file=sys.stderr)
            return 2
    text = render_table(before, after)
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text + "\n")
    if args.png:
        print(f"figure: {write_figure(before, after, args.png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
