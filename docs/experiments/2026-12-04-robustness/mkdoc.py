import json, sys
from pathlib import Path

R = Path(__file__).parent  # the JSON rows table.py wrote


def load(*names):
    rows = {}
    for n in names:
        p = R / n
        if p.exists():
            for r in json.loads(p.read_text()):
                rows[r["case"]] = r
    return rows


before = load("before.json", "before2.json", "before3.json")
after = load("after.json", "after2.json", "after3.json")


def cell(r):
    if r is None:
        return "not run"
    last = r["last_stderr"].replace("|", "\\|").replace("\u2588", "")
    if len(last) > 150:
        last = last[:147] + "…"
    note = (" — " + r["note"].replace("|", "\\|")[:160]) if r["note"] else ""
    return f"exit {r['exit']}: `{last}`{note}" if last else f"exit {r['exit']}{note}"


lines = ["| input | before | after |", "|---|---|---|"]
for name in before:
    lines.append(f"| {name} | {cell(before.get(name))} | {cell(after.get(name))} |")
print("\n".join(lines))
