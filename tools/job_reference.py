"""Print the job-key reference as Markdown tables (pasted into the README; a test keeps them in step).

    python tools/job_reference.py train_network     # a script's job keys
    python tools/job_reference.py train_dreambooth  # the keys it adds to train_network's, or has instead
    python tools/job_reference.py datasets          # keys of [[datasets]] and [[datasets.subsets]]
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.config import schema  # noqa: E402


def reference(fields) -> str:
    sections = defaultdict(list)
    for key, field in fields.items():
        sections[field.section].append((key, field))
    out = []
    for section, rows in sections.items():
        out.append(f"**{section}**\n\n| key | type | default | meaning |\n|---|---|---|---|")
        for key, field in rows:
            default = "—" if field.default is None else f"`{field.default!r}`".replace("'", '"')
            choices = f" One of: {', '.join(map(str, field.choices))}." if field.choices else ""
            cells = [f"`{key}`", field.type, default, f"{field.help}{choices}"]
            # a "|" in a cell (int|list[int], '|||', {a|b}) would end it: Markdown tables take "\|"
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells).replace("\n", " ") + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["train_network"]:
        if name == "datasets":
            from library.dataset import DATASET_FIELDS, SUBSET_FIELDS, SUBSET_ONLY_FIELDS

            print(reference({**SUBSET_ONLY_FIELDS, **SUBSET_FIELDS, **DATASET_FIELDS}))
        elif name in ("train_network", "sample"):
            print(reference(schema(name).fields))
        else:
            base = schema("train_network").fields
            print(reference({k: f for k, f in schema(name).fields.items() if base.get(k) != f}))
