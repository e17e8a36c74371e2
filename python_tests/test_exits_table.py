"""scripts/exits_table.py: the README's tables of the shipped exits, from the shipped results."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("exits_table", ROOT / "scripts" / "exits_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tables_show_every_shipped_exit_with_its_figures():
    mod = _script()
    results = json.loads((ROOT / "docs/results/default_exits.json").read_text())
    docs = json.loads((ROOT / "docs/results/default_exits_python_docs.json").read_text())
    table = mod.exits_table(results, docs).splitlines()
    exits = results["info"]["exits"]
    assert len(table) == 2 + len(exits) + 1 and table[-1].startswith("| 30 (full) | 1 |")
    for line, k in zip(table[2:], exits):
        row = next(r for r in results["rows"] if r["method"] == "balcony" and r["exit"] == k)
        assert line.startswith(f"| {k} | {row['rel_cost']:.2f} | **{row['chat_top1']:.3f}** (")
        assert "-" not in line.replace("---", "").split("|")[3]  # the affine figures are there
    routes = mod.routes_table(results).splitlines()
    assert routes[2].startswith("| full depth, 32k head |") and len(routes) == 2 + 4 + len(exits)
    # a results file without the Python docs or the affine exits still prints, with "-"
    results["rows"] = [r for r in results["rows"] if r["method"] != "affine"]
    assert "(-)" in mod.exits_table(results, None)
